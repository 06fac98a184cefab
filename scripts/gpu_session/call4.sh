# Call 4: carries the fourth part of the default model's GGUF only.
mkdir -p ~/parts && cp .carry/gemma.gguf.part03 ~/parts/ && ls ~/parts
