"""Speed, memory and FLOPs, measured the paper's way: every `rs-transfer bench` subcommand.

- latency.py: training-step latency, peak memory, inference throughput (`bench latency`; `bench table7` runs it
  on every Table 7 row, and rs_transfer/reproduce/table7.py renders that table)
- flops.py: params and GFLOPs (`bench flops`); specs.py: `NAME@RES` specs and the networks they build
- data.py: image loader throughput per worker (`bench data`); video_data.py: video clips per worker (`bench video-data`)
- index.py: one rank's start-up memory and time at N samples (`bench index`)
- commands.py: every subcommand's parser and handler (a new benchmark: a module here and its block there)
"""
