# A cross-layer transcoder over all 30 layers of SmolLM2-135M (--cross_layer=True), beside the per-layer
# transcoder sets of config/smollm2_all_layers.py on the same tokens and steps: batchtopk, k 16 a layer (each layer's
# features selected over the batch; the same mean L0 as the sets), 1,152 features a layer, no skip path (circuit-
# tracer's CLT loader reads none). Its evaluation replaces every layer's mlp_out at once (ce_sae) and gives the FVU of
# each target layer (fvu_by_layer).
init_from = "models/smollm2-135m"
data_dir = "data/smollm2"
out_dir = "out/smollm2_all_layers_clt"
layers = "all"
cross_layer = True
site = "mlp_in"
target_site = "mlp_out"
arch = "batchtopk"
k = 16
d_sae = 1152
batch_size = 1024
buffer_tokens = 2**14
harvest_batch = 8
lr = 3e-3
max_iters = 200
eval_interval = 100
eval_tokens = 512
resample_iters = ()
dead_window = 200_000
dtype = "float32"
