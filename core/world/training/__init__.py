"""The tools that trained the embedded world (docs/world.md): ``train_model`` (the tiny
text-to-image model), ``train_judge`` (the attribute-reading judge) and ``train_loras`` (the four
example LoRAs; ``apply_lora`` merges one the way the training code does). Each runs as
``python -m weightsmith.core.world.training.<name>``; nothing at run time needs them.
"""
