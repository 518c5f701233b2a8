"""``python -m compressor``: the ``hant`` command, so torchrun can start it on every rank.

    torchrun --nproc_per_node=2 -m compressor distill tf_efficientnet_lite0 --data DIR
"""

from .cli import hant

if __name__ == "__main__":
    hant(prog_name="python -m compressor")
