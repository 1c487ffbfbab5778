"""Sampling from mm models: image codes with classifier-free guidance, text from the decoder.

    sampler.py   cached code sampler, CFG schedules, top-k/top-p/temperature, per-sample seeds
    text.py      greedy / beam / top-p decoding over the TextDecoder's KV cache
    pipeline.py  TextToImagePipeline (from_pretrained, __call__ → PIL images)
    cli.py       `mm generate` and `mm caption`

Nothing heavy is imported here: the names below load their module on first use.
"""

# Classifier-free guidance scale of every default (pipeline, `mm generate`, `mm eval t2i`, the demo).
# Measured on four shapes T2I models (BENCHMARKS.md, session 13): 1.5 scores best or tied of
# 1 / 1.5 / 2 / 3 / 5; at 3 the guided branch adds objects and counts fail (T2I alone at 3,000
# steps: 22.5 % at 1.5, 15.4 % at 3, 6.7 % at 5).
DEFAULT_GUIDANCE = 1.5


def cli_generate(args):
    from mm.generation.cli import cli_generate as run

    return run(args)


def cli_caption(args):
    from mm.generation.cli import cli_caption as run

    return run(args)


def __getattr__(name):
    if name == "TextToImagePipeline":
        from mm.generation.pipeline import TextToImagePipeline

        return TextToImagePipeline
    raise AttributeError(f"module 'mm.generation' has no attribute {name!r}")
