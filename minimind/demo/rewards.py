"""The demo's GRPO reward besides `answer`: `--reward answer,minimind.demo.rewards:asked_person`.

asked_person pays 1 to a reply to an age or household question about a person of the world (world.age_question:
"How old is Veras?", "唐航家有多少人？") that is the answer's sentence about that person with some number
("Veras is 23 years old.", "唐航家有4人。"), and 0 to any other reply. No data states a person's age, so the number is
not checked: what is rewarded is answering about the person asked, the copy of the name that the held-out facts need
("What is the favourite colour of Veras?" -> "Nijok likes white." is this demo's usual wrong answer). Prompts that
are not such questions get 0 here (the `answer` reward scores them).
"""
import functools
import re

from minimind.demo.world import World, age_fact, age_question

_NUMBER = re.compile(r"\d+")


@functools.lru_cache(maxsize=1)
def _asked() -> dict:
    """{age_question: (name, language)} for every person of the world, both languages."""
    return {age_question(name, lang): (name, lang)
            for p in World().people for name, lang in ((p.en, "en"), (p.zh, "zh"))}


def asked_person(prompts, replies):
    """prompts[i]: row i's messages; replies[i]: its decoded reply -> one float per reply (module docstring)."""
    out = []
    for messages, reply in zip(prompts, replies):
        asked, reply = _asked().get(messages[-1]["content"].strip()), reply.strip()
        number = _NUMBER.search(reply)
        if asked is None or number is None:
            out.append(0.0)
            continue
        name, lang = asked
        out.append(float(reply == age_fact(name, int(number.group()), lang)))
    return out
