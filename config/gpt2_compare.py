# The comparison itself: l1, jl and hybrid SAEs at their default coefficients, trained side by side on the same
# GPT-2 small activations (one forward and one shuffling buffer for the three; out/gpt2_compare/{sparsity,jl,hybrid}):
#   python sae.py config/gpt2_compare.py
init_from = "gpt2"
loss = ["sparsity", "jl", "hybrid"]
out_dir = "out/gpt2_compare"
