"""Weights of other libraries on mmtx's parts and back: timm's Vision Transformers (`timm`), Hugging Face's GPT-2
(`gpt2`) and Whisper (`whisper`) through `hf`, and ONNX export (`onnx`)."""
