"""The one-call GPU check (tools/gpu_check.sh, tools/gpu_check.py) on CPU: the wheel folder, the JPEG folder, the
budget and timeouts, and every part run with tiny settings while only the imports the GPU machine will have are
allowed (the standard library, torch/torchvision/timm and their requirements, the wheel folder)."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib.metadata import distributions
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from rs_transfer.engine.distributed import loader_workers

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
sys.modules["gpu_check"] = gpu_check
SPEC.loader.exec_module(gpu_check)

# The modules behind the commands the check runs (cli.py assembles the parsers of each package's commands.py, then
# a handler imports one of these) and the ones its helper subcommands import.
CHECK_MODULES = ("rs_transfer.errors", "rs_transfer.downstream.protocol", "rs_transfer.pretrain.run",
                 "rs_transfer.bench.latency", "rs_transfer.reproduce.table7", "rs_transfer.video.run",
                 "rs_transfer.bench.video_data", "rs_transfer.pretrain.synthetic", "rs_transfer.engine.device")

# The tiny run's sitecustomize: this venv's site-packages is swapped for a folder of links to the packages the GPU
# machine will have (device_site_packages), and the top-level packages imported are logged.
SITECUSTOMIZE = '''
import os
import sys
from importlib.machinery import PathFinder

_REAL, _DEVICE = os.environ["GPU_CHECK_REAL_SITE"], os.environ["GPU_CHECK_DEVICE_SITE"]
sys.path[:] = [_DEVICE if entry == _REAL else entry for entry in sys.path]
_LOG = os.environ["GPU_CHECK_IMPORT_LOG"]
_logged = set()


class _LogImports:
    def find_spec(self, name, path=None, target=None):
        if "." in name or name in sys.stdlib_module_names or name.startswith("_") or name in _logged:
            return None
        _logged.add(name)
        if PathFinder.find_spec(name) is not None:  # found, not an optional import that finds nothing
            with open(_LOG, "a") as log:
                log.write(name + "\\n")
        return None


sys.meta_path.insert(0, _LogImports())
'''


def device_distributions() -> set:
    """What the GPU machine will have: what torch, torchvision and timm require, the wheel folder, and pip."""
    return gpu_check.provided_distributions() | {gpu_check.normalise(d) for d in gpu_check.DEVICE_WHEELS} | {"pip"}


def device_site_packages(folder: Path) -> tuple:
    """(this venv's site-packages, FOLDER): FOLDER holds links to the files of device_distributions() only, so
    anything else installed here (scipy, DALI in the `nvidia` folder torch's CUDA wheels share) cannot be imported."""
    real = Path(sysconfig.get_paths()["purelib"])
    allowed = device_distributions()
    # each distribution's name read once: `dist.metadata` parses METADATA on every access (40 s over all files)
    named = [(gpu_check.normalise(dist.metadata["Name"]), dist) for dist in distributions()]
    owners = {}  # top-level entry of site-packages -> the distributions with files in it
    for name, dist in named:
        for file in dist.files or []:
            owners.setdefault(Path(file).parts[0], set()).add(name)
    for name, dist in named:
        if name not in allowed:
            continue
        for file in dist.files or []:
            parts = Path(file).parts
            if parts[0] in ("..", "__pycache__"):
                continue
            # an entry only allowed distributions use is linked whole; a shared one (nvidia/) is made here and
            # only the allowed distributions' entries in it are linked
            depth = 1 if owners[parts[0]] <= allowed or len(parts) == 1 else 2
            link = folder.joinpath(*parts[:depth])
            if not link.exists() and real.joinpath(*parts[:depth]).exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(real.joinpath(*parts[:depth]))
    return real, folder


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """The wheel folder as `prepare` writes it, with one small dependency instead of all (the tiny run finds the
    others in the device-like site-packages, as if installed from the folder)."""
    out = tmp_path_factory.mktemp("gpu_check") / "wheels"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    gpu_check.prepare(out, here, distributions=("cycler",))
    return out


def test_prepare_writes_our_wheel_a_dependency_and_the_manifest(wheels, tmp_path):
    manifest = json.loads((wheels / "manifest.json").read_text())
    files = sorted(p.name for p in wheels.glob("*.whl"))
    assert [name.split("-")[0] for name in files] == ["cycler", "rs_transfer"]
    assert manifest["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert [w["file"] for w in manifest["wheels"]] == files
    assert sum(w["bytes"] for w in manifest["wheels"]) == sum((wheels / f).stat().st_size for f in files)
    assert 0 < manifest["total_mib"] < gpu_check.LIMIT_MIB
    own = next(wheels.glob("rs_transfer-*.whl"))
    with zipfile.ZipFile(own) as wheel:
        names = set(wheel.namelist())
    for module in CHECK_MODULES:
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module
    assert not [n for n in names if "__pycache__" in n]

    site = tmp_path / "site"
    report = gpu_check.install(wheels, site)
    # cycler is installed in this venv, as torch is on the device: only our own wheel goes into the site
    assert report["installed"] == [own.name] and "cycler" in report["already_present"]
    where = subprocess.run([sys.executable, "-c", "import rs_transfer; print(rs_transfer.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert Path(where.stdout.strip()).parent == site / "rs_transfer"


def test_install_leaves_out_wheels_for_another_python_and_names_them(wheels, tmp_path):
    other = tmp_path / "wheels"
    other.mkdir()
    manifest = json.loads((wheels / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "python_version": "3.99"}))
    own = next(wheels.glob("rs_transfer-*.whl"))
    shutil.copy(own, other / own.name)
    (other / "absent_dist-1.0-cp27-cp27mu-manylinux1_x86_64.whl").write_bytes(b"")
    report = gpu_check.install(other, tmp_path / "site")
    assert report["installed"] == [own.name]
    assert list(report["not_installed"]) == ["absent_dist-1.0-cp27-cp27mu-manylinux1_x86_64.whl"]
    assert "--python-version" in report["warning"]


@pytest.mark.parametrize("name, version, fits", [
    ("av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", (3, 11), True),
    ("av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", (3, 13), True),
    ("av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", (3, 10), False),
    ("kiwisolver-1.5.1-cp311-cp311-manylinux2014_x86_64.whl", (3, 12), False),
    ("kiwisolver-1.5.1-cp312-cp312-manylinux2014_x86_64.whl", (3, 12), True),
    ("six-1.17.0-py2.py3-none-any.whl", (3, 12), True),
])
def test_wheel_tags_decide_what_fits(name, version, fits):
    assert gpu_check.wheel_fits(Path(name), SimpleNamespace(major=version[0], minor=version[1])) is fits


def imports_of(module: str) -> set:
    """Modules a module of this package imports anywhere in its body (function-level imports too)."""
    parts = module.split(".")
    path = REPO.joinpath(*parts)
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_own_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return (path / "__init__.py").is_file() or path.with_suffix(".py").is_file()


def test_every_third_party_import_of_the_check_is_on_the_device():
    seen, todo, third_party = set(), list(CHECK_MODULES), {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in imports_of(module):
            top = name.partition(".")[0]
            if top == "rs_transfer":
                parts = name.split(".")
                todo.extend(p for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if is_own_module(p))
            elif top not in sys.stdlib_module_names:
                third_party.setdefault(top, set()).add(module)
    assert {"torch", "omegaconf", "av", "matplotlib"} <= set(third_party)
    on_device = gpu_check.top_level_modules(device_distributions())
    # experiment trackers: extras imported only when a run's train.loggers names them, which the check's runs do not
    optional = {"wandb", "mlflow"}
    missing = {top: sorted(where) for top, where in third_party.items() if top not in on_device | optional}
    assert not missing, f"imported by the check, neither on the device nor in DEVICE_WHEELS: {missing}"


def test_jpeg_folder_layout_and_images(tmp_path):
    report = gpu_check.make_jpegs(tmp_path / "a", classes=3, train_per_class=4, val_per_class=2)
    assert (report["train_images"], report["val_images"]) == (12, 6)
    for split, count in (("train", 4), ("val", 2)):
        classes = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert classes == ["n00000000", "n00000001", "n00000002"]
        for name in classes:
            files = sorted((tmp_path / "a" / split / name).glob("*.jpg"))
            assert len(files) == count
            for path in files:
                with Image.open(path) as image:
                    assert (image.format, image.size, image.mode) == ("JPEG", (500, 375), "RGB")
                    image.load()
    # the device writes the folder with many processes: the files must not depend on that
    subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "make-jpegs", "--root", str(tmp_path / "b"),
                    "--classes", "3", "--train-per-class", "4", "--val-per-class", "2", "--processes", "2"],
                   check=True, capture_output=True)
    first = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert first == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in first)


def test_throughput_leaves_out_warm_up_windows(tmp_path):
    events = [{"kind": "train", "step": 10, "images_per_s": 100.0},
              {"kind": "train", "step": 20, "images_per_s": 200.0}, {"kind": "eval", "step": 20, "top1": 0.5},
              {"kind": "train", "step": 30, "images_per_s": 400.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    speed = gpu_check.throughput(path, batch=8, warmup_steps=10)
    # 80 images in 0.4 s, then 80 in 0.2 s: 160 / 0.6
    assert speed["per_s"] == pytest.approx(266.67, abs=0.01)
    assert speed["timed_samples"] == 160 and speed["windows_per_s"] == [200.0, 400.0]
    with pytest.raises(gpu_check.PartError, match="no train log window after step 30"):
        gpu_check.throughput(path, batch=8, warmup_steps=30)


def test_a_part_that_hangs_is_killed_at_its_timeout_and_the_budget_skips_later_parts(tmp_path):
    runner = gpu_check.Runner(tmp_path, tmp_path / "site", budget_s=600, started=time.time())
    begun = time.time()
    with pytest.raises(gpu_check.PartError, match="timed out after 1 s"):
        runner.python("pretrain", ["-c", "import time; time.sleep(60)"], timeout=1)
    assert time.time() - begun < 30
    assert runner.timeout("pretrain", parts_after=0) == gpu_check.TIMEOUTS["pretrain"]
    spent = gpu_check.Runner(tmp_path, tmp_path / "site", budget_s=30, started=time.time())
    with pytest.raises(gpu_check.PartError, match="budget"):
        spent.timeout("table7_fp32", parts_after=2)


def test_every_goal_key_is_documented_with_its_unit():
    text = (REPO / "docs" / "benchmarks.md").read_text()
    section = text.split("### The `goal` object", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    assert [key.strip().strip("`") for key, _, _ in rows] == list(gpu_check.GOAL_KEYS)
    assert all(unit.strip() and meaning.strip() for _, unit, meaning in rows)
    assert gpu_check.GOAL_IMG_S_PER_GPU == 3889  # 448M images / 14,400 s / 8 GPUs


def test_the_script_prints_one_json_object_even_when_the_helper_fails():
    # the test's own interpreter, not whichever python3 is first on PATH (a venv that is not activated)
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--no-such-option"], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1
    assert "exited with 2" in json.loads(done.stdout)["error"]


@pytest.mark.slow
def test_every_part_runs_on_cpu_with_only_the_device_imports(wheels, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    real, device = device_site_packages(tmp_path / "device-site-packages")
    imports = tmp_path / "imports.log"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(hooks), "GPU_CHECK_REAL_SITE": str(real),
           "GPU_CHECK_DEVICE_SITE": str(device), "GPU_CHECK_IMPORT_LOG": str(imports)}
    work = tmp_path / "run"
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--tiny", "--device", "cpu", "--wheels",
                           str(wheels), "--site", str(tmp_path / "site"), "--work", str(work), "--budget-s", "600"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    used = set(imports.read_text().split())

    assert result["errors"] == [], {p: result[p] for p in result["errors"]}
    # DALI is not in the wheel folder: where it cannot be imported its figure is null, with the reason
    assert result["dali"]["images_per_s"] is None and "nvidia.dali is not importable" in result["dali"]["reason"]
    assert result["install"]["installed"] == [next(wheels.glob("rs_transfer-*.whl")).name]
    assert result["jpegs"]["train_images"] == 2 * 8 and result["jpegs"]["val_images"] == 2 * 2

    pretrain, model_only = result["pretrain"], result["model_only"]
    windows = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert pretrain["images_per_s"] > 0 and model_only["train_img_s"] > 0
    assert (pretrain["model"], pretrain["image_size"], pretrain["batch"]) == ("rs26-w0.25", 32, 8)
    assert (model_only["model"], model_only["resolution"], model_only["batch"]) == ("rs26-w0.25", 32, 8)
    assert model_only["channels_last"] is True and pretrain["channels_last"] is True
    assert result["e2e_over_model_only"] == round(pretrain["images_per_s"] / model_only["train_img_s"], 4)
    compiled = result["model_only_compiled"]
    assert (compiled["compile_backend"], compiled["batch"]) == (gpu_check.TINY.compile_backend, 8)
    assert compiled["train_img_s"] > 0 and compiled["compile_s"] > 0
    # the real loader with the recipe's worker count; one evaluation and its checkpoint at the last step, timed
    assert pretrain["num_workers"] == "auto" and "data.num_workers=auto" in pretrain["command"]
    assert pretrain["loader_workers"] == loader_workers("auto")[0] == result["goal"]["e2e_num_workers"]
    assert pretrain["peak_mem_gib"] is None and 0.1 < pretrain["peak_rss_gib"] < 16
    assert len(pretrain["eval_s"]) == len(pretrain["checkpoint_blocking_s"]) == 1
    assert len(pretrain["checkpoint_write_s"]) == 1 and pretrain["checkpoint_write_s"][0] > 0
    # wall_s - train_s of summary.json holds the evaluation (and the checkpoint's host copy, the last write's wait)
    assert pretrain["bookkeeping_s"] >= pretrain["eval_s"][0] > 0 and pretrain["checkpoint_blocking_s"][0] > 0
    assert [e["kind"] for e in windows].count("eval") == 1
    timed = [e for e in windows if e["kind"] == "train" and e["step"] > pretrain["warmup_steps_left_out"]]
    assert pretrain["windows_images_per_s"] == [e["images_per_s"] for e in timed]
    assert pretrain["timed_images"] == (6 - 2) * 8

    video, video_model = result["video_train"], result["video_model_only"]
    assert video["clips_per_s"] > 0 and video_model["clips_per_s"] > 0
    assert video["timed_clips"] == (4 - 2) * 2 and video_model["batch"] == 2
    assert result["video_e2e_over_model_only"] == round(video["clips_per_s"] / video_model["clips_per_s"], 4)
    assert result["video_loader"]["loader"][0]["clips_per_s"] > 0

    # Table 7 takes only its own rows: the tiny run measures the cheapest one once, in fp32
    assert "table7_bf16" not in result
    table = result["table7_fp32"]
    assert [row["spec"] for row in table["rows"]] == ["rs50@160"], table
    assert table["rows"][0]["s_per_128"] > 0 and table["pareto_png"] is True

    goal = result["goal"]
    assert tuple(goal) == gpu_check.GOAL_KEYS
    assert goal["e2e_img_s"] == pretrain["images_per_s"] and goal["e2e_peak_rss_gib"] == pretrain["peak_rss_gib"]
    assert goal["eval_s"] == pretrain["eval_s"][0] and goal["checkpoint_write_s"] == pretrain["checkpoint_write_s"][0]
    assert goal["model_only_compiled_img_s"] == compiled["train_img_s"]
    assert goal["video_clips_s"] == video["clips_per_s"]
    assert goal["dali_img_s"] is None and goal["dali_reason"] == result["dali"]["reason"]
    assert goal["e2e_peak_mem_gib"] is None  # CUDA's figure; on a CPU the peak RSS stands for it
    nulls = {"e2e_peak_mem_gib", "dali_img_s"}
    assert not [key for key in gpu_check.GOAL_KEYS if key not in nulls and goal[key] is None]
    assert result["seconds"] < 600

    unused = [d for d in gpu_check.DEVICE_WHEELS if not gpu_check.top_level_modules([d]) & used]
    assert not unused, f"in DEVICE_WHEELS but imported by no part: {unused}"
