"""The paper's language partitions (Table 1) as data, and the training-language choices."""
from typing import Sequence

from xlmr_mini.data.task import Split, TaskData
from xlmr_mini.errors import InputError

# MASSIVE 1.1: 52 locales (51 languages; zh-CN and zh-TW). "sl-SL" is MASSIVE's own code for Slovenian.
MASSIVE_LOCALES = frozenset(
    "af-ZA am-ET ar-SA az-AZ bn-BD ca-ES cy-GB da-DK de-DE el-GR en-US es-ES fa-IR fi-FI fr-FR he-IL "
    "hi-IN hu-HU hy-AM id-ID is-IS it-IT ja-JP jv-ID ka-GE km-KH kn-IN ko-KR lv-LV ml-IN mn-MN ms-MY "
    "my-MM nb-NO nl-NL pl-PL pt-PT ro-RO ru-RU sl-SL sq-AL sv-SE sw-KE ta-IN te-IN th-TH tl-PH tr-TR "
    "ur-PK vi-VN zh-CN zh-TW".split()
)
TSM_LANGUAGES = frozenset("arabic english french german hindi italian portuguese spanish".split())

# Table 1, "unseen lang partition"; every other language of the dataset is "seen".
UNSEEN: dict[str, frozenset[str]] = {
    "massive": frozenset(
        "am-ET cy-GB af-ZA km-KH sw-KE mn-MN tl-PH kn-IN te-IN sq-AL ur-PK az-AZ ml-IN ms-MY ca-ES "
        "sl-SL sv-SE ta-IN nl-NL it-IT he-IL pl-PL da-DK nb-NO ro-RO th-TH fa-IR".split()
    ),
    "tsm": frozenset("arabic french hindi portuguese".split()),
}
ENGLISH = {"massive": "en-US", "tsm": "english"}
KNOWN_LANGUAGES = {"massive": MASSIVE_LOCALES, "tsm": TSM_LANGUAGES}
LANGUAGE_CHOICES = ("all", "seen", "unseen", "english")

assert len(MASSIVE_LOCALES) == 52 and UNSEEN["massive"] <= MASSIVE_LOCALES
assert len(UNSEEN["massive"]) == 27 and UNSEEN["tsm"] <= TSM_LANGUAGES


def resolve_languages(choice: str | Sequence[str], task: TaskData) -> frozenset[str]:
    """The languages that `choice` names for `task`: all | seen | unseen | english | a list.

    A list may also be one comma-separated string. Every language it names must be present in
    the task's data; the error lists the ones that are.
    """
    present = frozenset(task.languages)
    if isinstance(choice, str) and choice in LANGUAGE_CHOICES:
        if choice == "all":
            return present
        if choice == "seen":
            return present - task.unseen
        if choice == "unseen":
            return present & task.unseen
        if task.english is None or task.english not in present:
            raise InputError(
                f"{task.source}: language choice 'english' has no English in this data "
                f"(languages: {', '.join(sorted(present))})"
            )
        return frozenset([task.english])
    names = [c.strip() for c in choice.split(",")] if isinstance(choice, str) else [str(c).strip() for c in choice]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"language choice {choice!r} names no language; use one of {', '.join(LANGUAGE_CHOICES)} or a list")
    unknown = sorted(set(names) - present)
    if unknown:
        raise InputError(
            f"{task.source}: unknown language(s) {', '.join(unknown)} in language list "
            f"(this {task.name} data has: {', '.join(sorted(present))})"
        )
    return frozenset(names)


def select_languages(split: Split, choice: str | Sequence[str], task: TaskData) -> Split:
    """The examples of `split` whose language `choice` selects, in their original order.

    Selecting languages that this split happens not to contain (e.g. `seen` on a split of only
    unseen languages) is an error, since training or evaluating on nothing is never intended.
    """
    wanted = resolve_languages(choice, task)
    keep = [i for i, lang in enumerate(split.langs) if lang in wanted]
    if not keep:
        raise InputError(
            f"{task.source}: language choice {choice!r} selects no examples "
            f"(selected: {', '.join(sorted(wanted)) or 'none'}; split has: {', '.join(sorted(set(split.langs)))})"
        )
    return split.take(keep)


def check_partition(languages, dataset: str, where: str) -> frozenset[str]:
    """Validate a user-given partition list against the dataset's known languages."""
    known = KNOWN_LANGUAGES.get(dataset)
    languages = frozenset(languages)
    if known is not None:
        unknown = sorted(languages - known)
        if unknown:
            raise InputError(f"{where}: unknown {dataset} language(s) in partition list: {', '.join(unknown)}")
    return languages
