"""xlmr_mini: distil multilingual XLM-R classifiers into smaller students.

Module map. Three layers; a module imports only from its own layer or the layers below it
(`tests/test_structure.py` checks this on every module).

- core: `config` (architecture sizes), `model` (the encoder), `checkpoint` (HF directories in and
  out), `tokenizer`, `errors` (one-line bad-input errors, exit 2), `files` (atomic writes),
  `hardware` (devices, the precision that fits them).
- library: `copy_weights` (student initialization by weight copy), `kd_loss` (the TinyBERT loss,
  the one reference), `kernels` (its fused Triton kernels), `data` (datasets, partitions,
  batching, the demo task), `metrics` (micro- and macro-F1), `inference` (scoring a model on a
  split), `kd_step` (one KD optimizer step), `step_impl` (which KD loss implementation and
  compilation the step runs on a device, self-checked on the first batch), `progress` (the
  progress bar), `distributed`
  (torchrun and DDP: process group, batch shares, gathered evaluation, rank-0 writes), `vocab`
  (exact vocabulary trimming: kept ids, remapping, trimmed state dicts and tokenizers),
  `teacher_cache` (the teacher's outputs computed once, kept on disk, read back).
- applications: `train` (the CLI and the loop) with its parts `train_config` (flags),
  `run_setup` (data, models, step context), `run_dir` (checkpoints, metrics.jsonl, out-dir
  claims and locks), `run_identity` (what makes two runs the same: settings and input content),
  `results` (scores and summaries) and `demo_models` (the demo's teacher and base);
  `evaluate`, `check`, `predict` (a file of texts classified), `trim` (a saved model and its
  tokenizer trimmed to a dataset's tokens); `cache_teacher` (a teacher's outputs for a run
  computed and kept, without training);
  `study` (the paper's tables and figures in one command) with `study_plan` (which runs),
  `select_teacher` (the best of the teacher seeds), `study_estimate` (step rates) and
  `study_report` (tables, figures); `__main__` (`python -m xlmr_mini` lists the commands); and the
  benchmarks in `bench/`.

`kernels/` and `data/` sit at the top of the source tree and install as `xlmr_mini.kernels` and
`xlmr_mini.data` (setup.py's package_dir; an editable install maps them the same way).
"""

__version__ = "0.1.0"  # the one place; setup.py reads it from here

LAYERS = {
    "core": ("config", "model", "checkpoint", "tokenizer", "errors", "files", "hardware"),
    "library": ("copy_weights", "kd_loss", "kernels", "data", "metrics", "inference", "kd_step", "progress",
                "distributed", "vocab", "step_impl", "teacher_cache"),
    "application": ("train", "cache_teacher", "train_config", "run_setup", "run_dir", "run_identity", "results", "demo_models",
                    "evaluate", "check", "predict", "trim", "study", "study_plan", "select_teacher", "study_estimate",
                    "study_report", "bench", "__main__"),
}
