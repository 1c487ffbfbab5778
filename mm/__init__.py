"""mm: one shared Transformer backbone for vision-language pretraining, text-to-image and VQA.

Importing ``mm`` is cheap and has no side effects: submodules (and heavy libraries such as
diffusers, transformers or wandb) are imported only when used.
"""

__version__ = "0.1.0"
