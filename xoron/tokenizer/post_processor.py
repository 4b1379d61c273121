"""The post-processor of tokenizer.json (TemplateProcessing, Bert/RobertaProcessing): the special
tokens that add_special_tokens=True wraps a sequence in."""

from __future__ import annotations


class PostProcessor:
    """`spec` is tokenizer.json's post_processor (None: there is none); `token_to_id` looks up
    the tokens a template names without giving their ids."""

    def __init__(self, spec, token_to_id):
        self._procs = (spec.get("processors", []) if spec.get("type") == "Sequence" else [spec]) if spec else []
        self._token_to_id = token_to_id

    def wrapping_specials(self):
        """(first, last) special token ids that the post-processor wraps a sequence in; None
        without a post-processor."""
        if not self._procs:
            return None
        first = last = None
        for p in self._procs:
            t = p.get("type")
            if t == "TemplateProcessing":
                single = p.get("single") or []
                specials = p.get("special_tokens") or {}

                def sid(item):
                    st = item.get("SpecialToken")
                    if not st:
                        return None
                    ids = (specials.get(st["id"]) or {}).get("ids") or []
                    return ids[0] if ids else self._token_to_id(st["id"])
                if single and sid(single[0]) is not None:
                    first = sid(single[0])
                if single and sid(single[-1]) is not None:
                    last = sid(single[-1])
            elif t in ("BertProcessing", "RobertaProcessing"):
                first, last = p["cls"][1], p["sep"][1]
        return first, last

    def apply(self, ids: list[int]) -> list[int]:
        """`ids` wrapped as the post-processor says."""
        for p in self._procs:
            t = p.get("type")
            if t == "TemplateProcessing":
                specials = p.get("special_tokens") or {}
                out: list[int] = []
                for item in p.get("single") or []:
                    if "Sequence" in item:
                        out.extend(ids)
                    else:
                        name = item["SpecialToken"]["id"]
                        sp = specials.get(name)
                        if sp and sp.get("ids"):
                            out.extend(int(x) for x in sp["ids"])
                        elif self._token_to_id(name) is not None:
                            out.append(self._token_to_id(name))
                ids = out
            elif t in ("BertProcessing", "RobertaProcessing"):
                ids = [p["cls"][1]] + ids + [p["sep"][1]]
            elif t == "ByteLevel":
                pass
            else:
                raise ValueError(f"unsupported post_processor {t!r} (use add_special_tokens=False)")
        return ids
