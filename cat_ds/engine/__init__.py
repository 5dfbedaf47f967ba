"""The training engine: the only package that imports DeepSpeed.

distributed.py  process groups (gloo on CPU, nccl on GPU), fail-fast policy
device.py       the device choice (CAT_DS_DEVICE) and GPU readiness before any rank starts (no torch)
model.py        model/tokenizer under HfDeepSpeedConfig (ZeRO-3 shards at load), checkpointing mode
data.py         cached tokenisation, per-epoch shuffling, per-rank micro-batches of each step
trainer.py      the run: setup (data, ds_config, model, DeepSpeed, resume, logger), the step, eval, save, export
normalization.py  how each loss is scaled across accumulation and ranks (the one explanation)
ds_config.py    the DeepSpeed config: load, fill "auto", ZeRO stage, checkpoint root
prepare.py      files made once by the main rank before the ranks read them (STG, GGUF, tokenizer)
faults.py       fault injection for tests (one object, None in real runs)
checkpoint.py   save/load with client state, atomic `latest`, keep-last-K
export.py       ZeRO checkpoint -> Hugging Face safetensors + tokenizer
preflight.py    launch-time checks without torch (config, ds_config, threads per rank)
plain_step.py   the plain PyTorch step benchmarks compare the engine with (not a trainer)
"""
