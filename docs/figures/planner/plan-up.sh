# splitserve plan: disaggregated 1P x1 + 1D x1, token budget 1024, max 64 seqs; predicted 1.52 req/s (0.76 per core) of chatbot at TTFT <= 2.0 s, TPOT <= 0.05 s, 90% attainment
# `splitserve up` on cores 0-1 (edit --cpus for this host)
splitserve up --mode disaggregated --prefill 1 --decode 1 --cpus 0,1 --token-budget 1024 --max-num-seqs 64
