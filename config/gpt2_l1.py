# GPT-2 small, layer 6 mlp_in, 8192 features, the l1 loss at its default coefficients (the comparison's baseline):
#   python sae.py config/gpt2_l1.py
init_from = "gpt2"
loss = "sparsity"
out_dir = "out/gpt2_l1"
