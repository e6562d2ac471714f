"""Models on megatron-core from Hugging Face configs.

- hf_config: HF config.json -> ArchSpec -> megatron TransformerConfig
- builder:   GPTModel chunks (TP/PP/virtual PP) with an LM, value, ORM or PRM head
- heads:     the non-LM heads and the pure functions reading their outputs
- mappings:  HF <-> megatron weight mappings as data, streaming HF checkpoint loading
- packaged:  real weights shipped inside pip packages (SmolLM2-135M-Instruct)

Importing this package imports nothing heavy; megatron-core and transformers are imported by
the functions that need them. See docs/models.md.
"""
