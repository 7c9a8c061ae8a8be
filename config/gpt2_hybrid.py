# GPT-2 small, layer 6 mlp_in, 8192 features, the hybrid loss at its default coefficients (the comparison's baseline):
#   python sae.py config/gpt2_hybrid.py
init_from = "gpt2"
loss = "hybrid"
out_dir = "out/gpt2_hybrid"
