"""Settings shared by the pipeline tests (a module with a unique name, importable from the tests)."""

# A micro ViT (96 wide) on 32^3 crops of 6 mm voxels, patch 8: 64 tokens, seconds per epoch on a CPU.
TINY = [
    "model.preset=micro",
    "model.patch_size=8",
    "data.roi=[32,32,32]",
    "data.spacing=[6.0,6.0,6.0]",
    "model.decoder_dim=48",
    "model.decoder_heads=4",
    "model.decoder_depth=1",
    "model.feature_size=8",
    "model.skip_blocks=[4,8]",
    "data.num_samples=2",
    "pretrain.batch_size=2",
    "finetune.batch_size=2",
    "data.flip_prob=0",
    "data.rot90_prob=0",
    "data.cache=memory",
    "runtime.progress=false",
    "runtime.threads=2",
    "pretrain.warmup_epochs=0.5",
    "finetune.warmup_epochs=0.5",
    "runtime.precision=fp32",  # not the demo's bf16-native: the same arithmetic on every CI CPU
]
