# The ReLU SAE's recipes side by side on SmolLM2-135M layer 15 mlp_in, on the same batches, each over three
# L1 coefficients: unit-norm decoder rows with a plain L1 (Bricken et al. 2023) against Anthropic's April 2024 recipe
# (L1 of f_i |W_dec,i|, free row norms, as SAELens 6's standard SAE trains), crossed with the initial encoder norm
# (tied init W_enc = init_norm W_dec^T; free rows start at init_norm too): 1 (our old default) or 0.1 (SAELens's).
# Needs the cache of config/smollm2_l15.py. python sae.py config/smollm2_l15_recipe.py
acts = "data/smollm2_l15"
out_dir = "out/smollm2_l15_recipe"
d_sae = 4608
batch_size = 1024
lr = 3e-3
l1_by_decoder_norm = [False, True]
init_norm = [1.0, 0.1]
l1_coeff = [1.5, 3.0, 6.0]
sparsity_warmup_iters = 200
max_iters = 2000
eval_interval = 1000
eval_tokens = 8192
resample_iters = ()
dead_window = 1_000_000
dtype = "float32"           # its README results were measured in fp32, before --dtype=auto chose bf16 on bf16 CPUs
