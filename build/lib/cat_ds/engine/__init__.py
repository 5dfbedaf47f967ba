"""The training engine: the only package that imports DeepSpeed.

distributed.py  process groups (gloo on CPU, nccl on GPU), fail-fast policy
model.py        model/tokenizer under HfDeepSpeedConfig (ZeRO-3 shards at load), checkpointing mode
data.py         cached tokenisation, per-epoch shuffling, per-rank micro-batches of each step
loop.py         the optimizer-step loop, signals, metrics
checkpoint.py   save/load with client state, atomic `latest`, keep-last-K
export.py       ZeRO checkpoint -> Hugging Face safetensors + tokenizer
preflight.py    launch-time checks without torch (config, ds_config, threads per rank)
plain_step.py   the plain PyTorch step benchmarks compare the engine with (not a trainer)
runner.py       set-up order and `train()`, what cat_ds/train.py calls
"""
