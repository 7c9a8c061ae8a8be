# GPT-2 small, layer 6 mlp_in, 8192 features, the jl loss at its default coefficients (the comparison's baseline):
#   python sae.py config/gpt2_jl.py
init_from = "gpt2"
loss = "jl"
out_dir = "out/gpt2_jl"
