# The whole pipeline offline on a CPU in a few minutes, on a small random GPT-2 (not a result):
#   python prepare.py --input='../shared/data/text/*.jsonl' --out_dir=data/local --val_tokens=100000 --shard_size=300000
#   python sae.py config/cpu_smoke.py
init_from = "scratch"
n_layer = 4
n_head = 4
n_embd = 128
layer = 2
data_dir = "data/local"
out_dir = "out/cpu_smoke"
d_sae = 512
batch_size = 1024
buffer_tokens = 2**14
harvest_batch = 16
block_size = 64
max_iters = 300
lr = 1e-3
l1_coeff = 0.5  # a random GPT-2 is not sparse: the default 5 silences every feature
loss = "hybrid"
sparsity_warmup_iters = 50
jl_decay_iters = 100
dead_window = 100_000
resample_iters = (200,)
eval_interval = 100
eval_tokens = 4096
log_interval = 20
