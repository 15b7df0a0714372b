"""aigw_models — local inference in numpy for the aigw model worker.

Modules:
  safetensors  read/write the safetensors format (F32, F16, BF16)
  tokenizers   GPT-2 byte-level BPE, SentencePiece, chat templates (jinja2)
  layers       RMSNorm, LayerNorm, RoPE, attention (GQA), activations
  transformer  Llama and GPT-2 families from Hugging Face folders, KV cache
  engine       sampling, stop sequences, batched decoding over slots
  embed        the hashing embedder (``hash-embed``)
  catalog      models under MODEL_PATH, loading by name
  serve        the bus worker serving models as ``model.<name>`` + ``model.admin``
  make_tiny    writes the tiny demo models (tiny-llama, tiny-gpt2)

Runs on Debian's /usr/bin/python3 with python3-numpy, python3-sentencepiece,
python3-jinja2 (and python3-zmq, python3-msgpack for serving).
"""
