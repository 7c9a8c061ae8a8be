# A transcoder per layer for all 30 layers of SmolLM2-135M from one forward a batch (--layers=all), mlp_in ->
# mlp_out, batchtopk at k 16 (a mean L0 of 16 in training; circuit-tracer reads it as the JumpReLU its threshold
# makes), plain and with the skip path: the per-layer transcoder sets that circuit-tracer reads (python analyze.py
# --mode=export --export_format=circuit_tracer). Each evaluation splices each layer alone (1 + 2 forwards a layer),
# then the replacement model of every layer at once (replacement.jsonl). Sized for 2 CPU cores: 200 steps of 1,024
# tokens, a buffer of 16,384 rows (30 x 1,152 columns, 2.3 GB), evaluation on 512 tokens (4 contexts).
init_from = "models/smollm2-135m"
data_dir = "data/smollm2"
out_dir = "out/smollm2_all_layers"
layers = "all"
site = "mlp_in"
target_site = "mlp_out"
arch = "batchtopk"
skip = [False, True]
k = 16
d_sae = 1152                       # 2 x 576 a layer
batch_size = 1024
buffer_tokens = 2**14
harvest_batch = 8
lr = 3e-3
max_iters = 200
eval_interval = 200
eval_tokens = 512
resample_iters = ()
dead_window = 200_000
dtype = "float32"
