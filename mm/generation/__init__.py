"""Sampling from mm models: image codes with classifier-free guidance, text from the decoder.

    sampler.py   cached code sampler, CFG schedules, top-k/top-p/temperature, per-sample seeds
    text.py      greedy / beam / top-p decoding over the TextDecoder's KV cache
    pipeline.py  TextToImagePipeline (from_pretrained, __call__ → PIL images)
    cli.py       `mm generate` and `mm caption`

Nothing heavy is imported here: the names below load their module on first use.
"""


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
