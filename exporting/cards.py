"""What a person finds beside the weights: a model card (README.md, with the Hub's YAML metadata) in every
export folder and Hub repo, and an Ollama Modelfile beside each GGUF.

The card says what was trained from what (base, dataset, method, trainer type, the hyperparameters that
matter), how well (metrics, and each artifact's agreement with the trained model in the program that loads
it), how to load it (PEFT, transformers, llama.cpp, Ollama) and under which licence (the base's).

The Modelfile's TEMPLATE is Ollama's Go-template form of the chat template the GGUF carries: the turn
markers are read off that template (rendered, as llama.cpp and transformers render it, with jinja2 on
marker messages), and the Modelfile is written with a TEMPLATE only where the markers reproduce the
GGUF's own rendering of sample conversations. Otherwise it has none and Ollama reads the GGUF's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The hyperparameters a reader of the card wants, by trainer type (the full request is in manifest.json).
SHOWN = ("learning_rate", "epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "max_length",
         "lr_scheduler_type", "seed")
LORA = ("lora_rank", "lora_alpha", "lora_dropout")
BY_TRAINER = {"sft": ("packing",), "dpo": ("beta",), "orpo": ("beta",), "simpo": ("beta",), "grpo": ("beta", "num_generations")}
METRICS = ("eval_loss", "perplexity", "accuracy", "train_loss", "reward_accuracy", "reward_margin", "train_reward")


@dataclass(frozen=True)
class CardFacts:
    """What every card of a job says, whatever its artifact."""
    job_id: str
    job_name: str | None
    base_model_id: str
    dataset_id: str
    provider: str
    method: str
    trainer_type: str
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    verification: dict[str, dict]
    license: str | None  # the base's, where it could be read
    location: str  # where the folder is published: a Hub repo id or a gs:// folder
    mmproj: str | None = None  # an image+text job: llama.cpp's projector file beside the GGUF
    vision: bool = False  # an image+text job: loaded with its processor and the image+text class


def base_license(base_model_id: str, hub) -> str | None:
    """The base model's licence: from its card's metadata, in its folder (a local base) or on the Hub
    (advisory: a Hub that cannot answer leaves it unknown, with a warning)."""
    from huggingface_hub import ModelCard

    folder = Path(base_model_id).expanduser()
    if folder.is_dir():
        readme = folder / "README.md"
        return ModelCard.load(readme).data.license if readme.is_file() else None
    try:
        return hub.license(base_model_id)
    except Exception as e:
        logger.warning("the base model's licence could not be read from the Hub (%s: %s); the card says so",
                       type(e).__name__, e)
        return None


def model_card(facts: CardFacts, artifacts: dict[str, str], gguf_file: str | None = None) -> str:
    """README.md for a folder holding `artifacts` (artifact -> form: adapter, merged bf16/fp16/q4, gguf q8_0...)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = not Path(facts.base_model_id).expanduser().is_dir()
    library = "peft" if "adapter" in artifacts else "transformers" if "merged" in artifacts else "gguf"
    tags = ["gemma", "fine-tuned", facts.method.lower(), facts.trainer_type, *(["gguf"] if "gguf" in artifacts else [])]
    data = ModelCardData(base_model=facts.base_model_id if hub_base else None, library_name=library,
                         license=facts.license, pipeline_tag="text-generation", tags=tags)
    title = facts.job_name or facts.job_id
    lines = [f"# {title}", "",
             f"A {facts.method} fine-tune ({facts.trainer_type.upper()}, {facts.provider}) of "
             f"`{facts.base_model_id}` on the dataset `{facts.dataset_id}`, by the job `{facts.job_id}`.", "",
             "## Contents", ""]
    lines += [f"- {describe(artifact, form, gguf_file)}" for artifact, form in artifacts.items()]
    lines += ["", "## Training", "", "| hyperparameter | value |", "|---|---|"]
    hp = facts.hyperparameters
    names = ("method", "trainer_type") + (LORA if facts.method != "Full" else ()) + SHOWN + \
        BY_TRAINER.get(facts.trainer_type, ())
    values = {"method": facts.method, "trainer_type": facts.trainer_type, **hp}
    unset = {"max_steps": -1}  # epochs decide the length then
    lines += [f"| {name} | {values[name]} |" for name in names
              if values.get(name) is not None and values[name] != unset.get(name)]
    shown = {k: facts.metrics[k] for k in METRICS if isinstance(facts.metrics.get(k), (int, float))}
    if shown:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in shown.items()]
        lines += ["", "`accuracy` is the share of the eval split's trained tokens predicted exactly; `perplexity` "
                  "is exp(`eval_loss`)."]
    checked = {a: v for a, v in facts.verification.items() if a in artifacts}
    if checked:
        lines += ["", "## Verification", "",
                  "Each artifact was loaded in the program that serves it and asked to predict the trained "
                  "model's greedy continuation of evaluation prompts, token by token. Agreement counts the decided "
                  "tokens; near ties (the trained model's top two logits closer than the stated margin, where "
                  "rounding may pick either) are counted apart:", "",
                  "| artifact | form | loaded in | top-1 agreement | required | tokens | near ties (flipped) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {a} | {v['form']} | {v['consumer']} | {v['top1_agreement']:.3f} | {v['required']:.2f} | "
                  f"{v['tokens']} | {v['near_ties']} ({v['near_ties_flipped']}) |" for a, v in checked.items()]
    lines += ["", "## How to load it", ""] + how_to_load(facts, artifacts, gguf_file)
    lines += ["", "## Licence", "",
              f"The licence of the base model applies: `{facts.license}`." if facts.license else
              f"The licence of the base model (`{facts.base_model_id}`) applies; it could not be read here: see "
              "the base model's own card."]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def describe(artifact: str, form: str, gguf_file: str | None) -> str:
    if artifact == "adapter":
        return "a LoRA adapter (PEFT: `adapter_config.json`, `adapter_model.safetensors`) and the tokenizer"
    if artifact == "merged":
        return f"the weights merged into the base, {form} (transformers: `config.json`, safetensors), and the tokenizer"
    return f"`{gguf_file}`: GGUF, {form}, for llama.cpp and Ollama (with a `Modelfile`)"


def how_to_load(facts: CardFacts, artifacts: dict[str, str], gguf_file: str | None) -> list[str]:
    where = facts.location
    gcs = where.startswith("gs://")
    source = "./model" if gcs else where
    lines = [f"Download the folder first: `gcloud storage cp -r {where} ./model`", ""] if gcs else []
    if facts.vision and ("adapter" in artifacts or "merged" in artifacts):
        lines += ["transformers, with the processor saved beside the weights (an adapter loads through PEFT "
                  "on its base):", "", "```python", "from transformers import AutoModelForImageTextToText, "
                  "AutoProcessor", "", f'model = AutoModelForImageTextToText.from_pretrained("{source}")',
                  f'processor = AutoProcessor.from_pretrained("{source}")', "```", ""]
        artifacts = {k: v for k, v in artifacts.items() if k == "gguf"}
    if "adapter" in artifacts:
        if facts.hyperparameters.get("use_dora"):
            lines += ["A DoRA adapter: load it through PEFT as below (transformers 4.x's `AutoModelForCausalLM` "
                      "on the folder also does); transformers 5.17's own adapter loading gives it other outputs.", ""]
        lines += ["PEFT, on the base model:", "", "```python", "from peft import AutoPeftModelForCausalLM",
                  "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{source}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{source}")', "```", ""]
    if "merged" in artifacts:
        lines += ["transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{source}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{source}")', "```", ""]
    if "gguf" in artifacts and facts.mmproj:
        budget = (facts.verification.get("gguf") or {}).get("image_max_tokens")
        # Gemma 4: the processor's budget of image tokens, which llama.cpp otherwise sets between 70 and 1120
        tokens = f" --image-min-tokens {budget} --image-max-tokens {budget}" if budget else ""
        lines += ["llama.cpp, with the image projector beside it:", "", "```sh",
                  f"llama-mtmd-cli -m {gguf_file} --mmproj {facts.mmproj}{tokens} --image picture.png "
                  "-p \"Describe it.\"", "```", ""]
        if budget:
            lines += [f"The image-token bounds give each picture the {budget} tokens at most that the model was "
                      "trained with (its processor's `max_soft_tokens`); a picture smaller than that budget is "
                      "scaled up a little differently by llama.cpp than by transformers.", ""]
    if "gguf" in artifacts:
        lines += ["llama.cpp:", "", "```sh", f"llama-cli -m {gguf_file} -cnv", "```", "",
                  "Ollama (in the folder with the `Modelfile`):", "", "```sh",
                  f"ollama create {facts.job_id} -f Modelfile", f"ollama run {facts.job_id}", "```", ""]
    return lines[:-1] if lines and lines[-1] == "" else lines


# ---- Ollama ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turns:
    """A chat template as the text around each message: what Ollama's Go template is written from."""
    user: tuple[str, str]
    assistant: tuple[str, str]
    system_sep: str  # between a system message and the first user message, inside that user's turn
    generation: str  # what asks the model to answer

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Modelfile's TEMPLATE produces for these messages (its Go template, step by step)."""
        out, system = [], ""
        for m in messages:
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                out += [self.user[0], system + self.system_sep if system else "", m["content"], self.user[1]]
                system = ""
            else:
                out += [self.assistant[0], m["content"], self.assistant[1]]
        return "".join(out) + self.generation

    def go_template(self) -> str:
        return ('{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}'
                f'{{{{ else if eq .Role "user" }}}}{self.user[0]}{{{{ if $system }}}}{{{{ $system }}}}{self.system_sep}'
                f'{{{{ $system = "" }}}}{{{{ end }}}}{{{{ .Content }}}}{self.user[1]}'
                f'{{{{ else if eq .Role "assistant" }}}}{self.assistant[0]}{{{{ .Content }}}}{self.assistant[1]}'
                f'{{{{ end }}}}{{{{ end }}}}{self.generation}')


SAMPLES = [
    [{"role": "user", "content": "What does the cow say?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "And the cat?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
]


def render_chat(template: str, messages: list[dict[str, str]], generation: bool = True) -> str:
    """The chat template rendered as transformers renders it (jinja2, sandboxed), without the BOS token,
    which llama.cpp and Ollama add themselves."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=generation, bos_token="",
                                            eos_token="")


def read_turns(template: str) -> Turns | None:
    """The turn markers of a chat template, if its renderings of SAMPLES are exactly what they give."""
    s, u, a = "\x01S\x01", "\x01U\x01", "\x01A\x01"
    try:
        one = render_chat(template, [{"role": "user", "content": u}], generation=False)
        asked = render_chat(template, [{"role": "user", "content": u}])
        pair = render_chat(template, [{"role": "user", "content": u}, {"role": "assistant", "content": a}], False)
        system = render_chat(template, [{"role": "system", "content": s}, {"role": "user", "content": u}], False)
        user = tuple(one.split(u))
        assistant = tuple(pair[len(one):].split(a))
        sep = system[len(user[0]):].split(s)[1].split(u)[0]
        turns = Turns(user, assistant, sep, asked[len(one):])
        if len(user) != 2 or len(assistant) != 2 or not asked.startswith(one):
            return None
        if all(turns.render(m) == render_chat(template, m) for m in SAMPLES):
            return turns
    except Exception as e:  # a template this reading does not cover
        logger.warning("the chat template's turns could not be read (%s: %s)", type(e).__name__, e)
    return None


def gguf_chat(gguf: Path) -> tuple[str | None, list[str]]:
    """The chat template a GGUF carries and the text of its end-of-turn and end-of-sequence tokens, where
    its metadata names them (llama.cpp's converter writes Gemma's <eos>; <end_of_turn> it finds by name)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    meta = llm.metadata
    stops = []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id"):
        if key in meta:
            text = llm.detokenize([int(meta[key])], special=True).decode("utf-8", errors="replace")
            if text and text not in stops:
                stops.append(text)
    return meta.get("tokenizer.chat_template"), stops


def modelfile(gguf: Path, mmproj: Path | None = None) -> str:
    """An Ollama Modelfile for the GGUF beside it: FROM, the GGUF's chat template as a TEMPLATE, its stops;
    an image+text model's projector as a second FROM, as Ollama imports one."""
    try:
        template, stops = gguf_chat(gguf)
    except Exception as e:  # the GGUF itself was verified in llama.cpp already: its Modelfile is a help, no more
        logger.warning("the GGUF's metadata could not be read for its Modelfile (%s: %s)", type(e).__name__, e)
        template, stops = None, []
    turns = read_turns(template) if template else None
    if turns and turns.assistant[1].strip():  # what ends the model's turn in the template: Gemma's <end_of_turn>
        stops = [turns.assistant[1].strip()] + [s for s in stops if s != turns.assistant[1].strip()]
    lines = ["# Ollama: `ollama create <name> -f Modelfile` in this folder, then `ollama run <name>`.",
             f"FROM ./{gguf.name}"]
    if mmproj is not None:
        lines += ["# The image projector: Ollama's use of a separate Gemma 3 projector has varied by version "
                  "(ollama/ollama#9967);", "# llama.cpp's llama-mtmd-cli with --mmproj is the path this job verified.",
                  f"FROM ./{mmproj.name}"]
    if turns:
        lines.append(f'TEMPLATE """{turns.go_template()}"""')
    else:
        logger.warning("no TEMPLATE in the Modelfile: Ollama will read the chat template from %s", gguf.name)
        lines.append("# TEMPLATE: none, so Ollama reads the chat template the GGUF carries")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
