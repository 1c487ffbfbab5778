# Sourced by the launch scripts in this folder. FSDP=1 shards the model with FSDP2 instead of DDP:
# it sets Accelerate's FSDP_* variables, each mm Transformer block is a unit
# (FSDP_TRANSFORMER_CLS_TO_WRAP overrides). Also works on CPU (gloo).
if [ "${FSDP:-0}" = "1" ]; then
    export ACCELERATE_USE_FSDP=true FSDP_VERSION=2 FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP \
        FSDP_TRANSFORMER_CLS_TO_WRAP="${FSDP_TRANSFORMER_CLS_TO_WRAP:-Block}" FSDP_STATE_DICT_TYPE=FULL_STATE_DICT
fi
