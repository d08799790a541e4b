"""The public test set: small configs of real Hugging Face families, random weights, fp32."""
from autotp.verify import HFModel

LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
MISTRAL = dict(model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=4, sliding_window=4)
QWEN2 = dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
GPT2 = dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)

FAMILIES = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "gpt2": GPT2}


def build(name: str, **overrides):
    return HFModel({**FAMILIES[name], **overrides})()

MIXTRAL = dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
QWEN2_MOE = dict(model_type="qwen2_moe", vocab_size=128, hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=48, shared_expert_intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
MOE_FAMILIES = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE}
FAMILIES_ALL = {**FAMILIES, **MOE_FAMILIES}


def build_any(name: str, **overrides):
    return HFModel({**FAMILIES_ALL[name], **overrides})()
