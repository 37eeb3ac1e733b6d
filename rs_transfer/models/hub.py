"""Weights by name, offline: `timm:NAME[.TAG]` (e.g. `timm:resnetrs152.tf_in1k`) is the file timm's pretrained
config names, found in the local Hugging Face cache, the one `timm.create_model(NAME, pretrained=True)` filled on
a machine with network. Nothing is downloaded: a tag that is not cached is an error saying how to fetch it.

The cache folder is huggingface_hub's (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub), read
with `huggingface_hub.try_to_load_from_cache`, which never touches the network.
"""

from pathlib import Path

from rs_transfer.errors import WeightsError

PREFIX = "timm:"
# What timm's hub loader tries for a timm/* repo (timm/models/_hub.py: the safetensors file first, then the pickle).
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def is_name(weights: str | Path) -> bool:
    return str(weights).startswith(PREFIX)


def resolve(weights: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local file `weights` stands for: a `timm:NAME[.TAG]` name resolved in the Hugging Face cache
    (`cache_dir`, default huggingface_hub's), anything else as the path it is.

    Raises WeightsError (one line naming the tag) for a name timm does not know, a timm model without hub
    weights, or weights that are not in the cache (with the command that fetches them on a machine with network).
    """
    if not is_name(weights):
        return Path(weights)
    name = str(weights)[len(PREFIX):]
    if not name.strip():
        raise WeightsError(f"{weights!s}: no weights name after {PREFIX} (e.g. timm:resnetrs152.tf_in1k); "
                           "`rs-transfer models` lists the weight tags")
    import huggingface_hub
    from timm.models import get_pretrained_cfg

    try:
        config = get_pretrained_cfg(name)
    except RuntimeError as error:  # timm: "Invalid pretrained tag (x) for resnetrs152."
        raise WeightsError(f"{weights}: {error}; `rs-transfer models` lists the weight tags") from None
    if config is None:
        raise WeightsError(f"{weights}: timm has no pretrained weights named {name!r}; "
                               "`rs-transfer models` lists the weight tags")
    if not config.hf_hub_id:
        raise WeightsError(f"{weights}: timm publishes these weights at {config.url or 'no address'}, not on the "
                               "Hugging Face hub; download the file and give its path")
    cache = Path(cache_dir) if cache_dir is not None else Path(huggingface_hub.constants.HF_HUB_CACHE)
    filenames = [config.hf_hub_filename] if config.hf_hub_filename else list(HUB_FILENAMES)
    for filename in filenames:
        found = huggingface_hub.try_to_load_from_cache(config.hf_hub_id, filename, cache_dir=str(cache))
        if isinstance(found, str):
            return Path(found)
    found = _snapshot_without_refs(cache, config.hf_hub_id, filenames, weights)
    if found is not None:
        return found
    raise WeightsError(
        f"{weights}: not in the Hugging Face cache {cache} (looked for {config.hf_hub_id}/{' or '.join(filenames)}); "
        f"on a machine with network run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`, "
        "then copy its Hugging Face cache here (or point HF_HUB_CACHE at it)")


def _snapshot_without_refs(cache: Path, repo_id: str, filenames: list, weights) -> Path | None:
    """The file in the repo's one snapshot when the cache has no refs/main to name it: a cache copied by hand
    (`cp -r snapshots`, a tar without refs/) keeps the files, and try_to_load_from_cache, which starts from the
    ref, misses them. None when no snapshot holds one; WeightsError when several do (which one is unknowable)."""
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = sorted(path for filename in filenames for path in snapshots.glob(f"*/{filename}") if path.is_file())
    if len(found) > 1:
        raise WeightsError(f"{weights}: the Hugging Face cache {cache} has no refs/main for {repo_id} and {len(found)} "
                           f"snapshots hold its weights ({', '.join(str(p) for p in found)}): give the path of one")
    return found[0] if found else None
