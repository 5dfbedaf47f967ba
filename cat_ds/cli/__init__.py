"""The `cat-ds` command line. Commands parse arguments and call into the package; heavy
imports (torch, transformers) happen inside commands so `cat-ds --help` stays fast.
One module per command family: data.py (records), run.py (training), results.py (models and runs)."""

from __future__ import annotations

import click

from cat_ds import __version__
from cat_ds.cli import data, results, run


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="cat-ds")
def main() -> None:
    """Causal Attention Tuning (CAT) of LLMs: data, training, evaluation, tracking."""


for _cmd in (data.data, data.tokenizer, data.annotate,
             run.train, run.prepare, run.doctor, run.plan_cmd, run.demo,
             results.eval_cmd, results.compare, results.attention, results.tracking, results.model,
             results.export_cmd):
    main.add_command(_cmd)
