"""Install llama.cpp's HF-to-GGUF converter from the pinned llama-cpp-python source distribution.

The converter (`convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py/`), and llama.cpp's
copies of the chat templates Gemma 4 ships (models/templates/, which tests/test_gemma4.py compares with the
fixtures'), are not in the llama-cpp-python wheel, only in its sdist, under vendor/llama.cpp. This takes them
from the sdist of the installed version, so converter and quantizer come from the same llama.cpp commit;
nothing of llama.cpp is kept in this repository. Run at install time (make setup-gguf, the Dockerfile):

    python scripts/fetch_llama_convert.py [--dest PREFIX/share/llama.cpp]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

# the converter, and the chat templates Gemma 4 ships as llama.cpp keeps them (tests/test_gemma4.py reads them)
WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE", "models/templates/google-gemma-4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(Path(sys.prefix) / "share" / "llama.cpp"))
    args = parser.parse_args()
    dest = Path(args.dest)
    pinned = version("llama_cpp_python")
    if (dest / "VERSION").is_file() and (dest / "VERSION").read_text().strip() == pinned and \
            any((dest / "models" / "templates").glob("google-gemma-4*")):
        print(f"converter of llama-cpp-python {pinned} already in {dest}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={pinned}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(WANTED)]
            for m in members:
                m.name = m.name[len(prefix):]
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    (dest / "VERSION").write_text(pinned + "\n")
    print(f"converter of llama-cpp-python {pinned}: {len(members)} files in {dest}")


if __name__ == "__main__":
    main()
