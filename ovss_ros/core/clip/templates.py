"""Prompt templates: the ImageNet set, the single template, or custom ones (checked here
without torch, so a bad ``templates`` setting is refused before any model library loads).

The 80 ImageNet templates are OpenAI's, as open_clip ships them (``OPENAI_IMAGENET_TEMPLATES``),
the standard protocol of NACLIP / SCLIP / ClearCLIP.
"""

from __future__ import annotations

import string

from ovss_ros.core.vocabulary import check_text, quoted

SINGLE_TEMPLATE = ("a photo of a {}.",)
MAX_TEMPLATES = 80  # as many as the OpenAI ImageNet set: prompts = queries x templates
MAX_TEMPLATE_LENGTH = 200  # characters; CLIP's context is 77 tokens anyway


def check_templates(templates: str) -> None:
    """ValueError naming the bad template (``template_set`` without building the ImageNet
    set)."""
    if templates not in ("imagenet", "single"):
        template_set(templates)


def template_set(templates: str) -> tuple[str, ...]:
    """``imagenet`` (the 80 OpenAI templates), ``single``, or custom templates joined by ``|``.

    A custom template must format with exactly one positional field ``{}`` and nothing else: no
    named or numbered field (``{room}``, ``{0}``), no second ``{}``, no conversion or format spec
    (``{!r}``, ``{:>9}``), balanced braces (``{{`` and ``}}`` are literal braces); at most
    MAX_TEMPLATES templates of at most MAX_TEMPLATE_LENGTH characters, without control or
    format characters. Raises ValueError naming the bad template (the text starts with
    ``templates``).
    """
    if templates == "imagenet":
        import open_clip  # the 80 templates; only their count is needed to check a setting

        return tuple(fill("{}") for fill in open_clip.OPENAI_IMAGENET_TEMPLATES)
    if templates == "single":
        return SINGLE_TEMPLATE
    if not isinstance(templates, str):
        raise ValueError(f"templates must be text, got {quoted(templates)}")
    if len(templates) > MAX_TEMPLATES * (MAX_TEMPLATE_LENGTH + 1):
        raise ValueError(f"templates is too long ({len(templates)} chars)")
    for index, piece in enumerate(templates.split("|")):  # as typed, before any stripping
        check_text(piece, f"templates: template {index}")
    custom = tuple(t.strip() for t in templates.split("|") if t.strip())
    if not custom:
        raise ValueError(
            f"bad templates {quoted(templates)}: use imagenet, single, or {{}}-templates joined "
            "by |"
        )
    if len(custom) > MAX_TEMPLATES:
        raise ValueError(f"templates: too many templates: {len(custom)} > {MAX_TEMPLATES}")
    for index, template in enumerate(custom):
        if len(template) > MAX_TEMPLATE_LENGTH:
            raise ValueError(
                f"templates: template {index} {quoted(template)} is too long "
                f"({len(template)} > {MAX_TEMPLATE_LENGTH} chars)"
            )
        problem = _template_problem(template)
        if problem:
            raise ValueError(
                f"templates: bad template {quoted(template)}: {problem}; a template needs "
                "exactly one {} where the class name goes (write {{ and }} for literal braces)"
            )
    return custom


def _template_problem(template: str) -> str | None:
    """Why ``template.format(name)`` would fail or not show the name once; None if it is fine."""
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:  # unbalanced braces
        return str(error)
    if not fields:
        return "it has no {} field"
    if len(fields) > 1:
        return f"it has {len(fields)} fields"
    name, spec, conversion = fields[0]
    if name:
        return f"it has the field {{{name}}} (only an empty {{}} is filled)"
    if conversion or spec:
        return "it has a conversion or format spec inside {}"
    return None
