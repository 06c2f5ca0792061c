"""Speed and memory benchmarks of medhpm against its baselines (MAE, MONAI), written as JSON.

Run ``python -m benchmarks`` from the repository root; ``python -m benchmarks --help`` lists the options.
Results land in ``benchmarks/results/<name>_<device>_<size>.json`` and the tables of
``docs/PERFORMANCE.md`` are regenerated from every JSON file present. Never used by the package itself.
Retired benchmarks (their question answered) keep their figures in docs/PERFORMANCE.md, frozen in
``benchmarks.report.RETIRED`` with the commit that holds the script.
"""

BENCHMARKS = ("pretrain_step", "sliding_window", "data_pipeline")
