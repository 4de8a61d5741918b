"""OLMo 2 decoders: no norm before a branch, one after each (on the branch output, before the residual
add), and q/k norms over the whole projection rather than per head, so their weights are sliced and
reordered with the query and key rows.
"""

from .base import ArchitectureAdapter, BranchNames

OLMO2 = ArchitectureAdapter(
    family="olmo2",
    model_types=("olmo2",),
    attention=BranchNames(module="self_attn", norms=("post_attention_layernorm",)),
    mlp=BranchNames(module="mlp", norms=("post_feedforward_layernorm",)),
    q_row_norms=("q_norm",),
    k_row_norms=("k_norm",),
    branch_outputs_normed=True,
)
