"""The conditioned conversation template, defined once (docs/architecture.md).

    <s>[system<|end_of_turn|>]GPT4 User: {user}<|end_of_turn|>GPT4 Assistant: {assistant}<|end_of_turn|>...

Training (`tokenize_conversation`), serving (`tokenize_prompt`) and the tokenizer's Jinja `chat_template`
(`chat_template`) all come from `Template`. The ids the chat template gives (what vLLM, TGI and every Hugging Face
user feed the model) are the truth, and training matches them by construction:
- each piece of text between two of the template's special tokens is tokenized wrapped in those very special tokens,
  which are then dropped, so context-sensitive tokenizers (SentencePiece's `▁` prefix only at the start of the text)
  see it exactly as in the rendered chat template;
- the tokenizer is used in the form its saved folder reads back as (`crlft.model.load_tokenizer`), the folder the
  exported model is served from.
A special-token literal typed inside a message (`<|end_of_turn|>`, `<s>`...) stays plain text here, where the chat
template's string would turn it into the control token; the server tokenizes with `tokenize_prompt`, so training and
serving agree on it too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

from crlft.config import Config
from crlft.data.records import Conversation, Message
from crlft.errors import CrlftError

END_OF_TURN = "<|end_of_turn|>"


@dataclass(frozen=True)
class Template:
    end_of_turn: str = END_OF_TURN
    role_prefix: str = "{condition} {role}:"
    user_role: str = "User"
    assistant_role: str = "Assistant"
    with_condition: bool = True  # False for the `weighted` and `sft` modes: no class in the prompt
    inference_condition: str = "GPT4"

    @classmethod
    def from_config(cls, cfg: Config) -> Template:
        t = cfg.template
        return cls(
            end_of_turn=t.end_of_turn,
            role_prefix=t.role_prefix,
            user_role=t.user_role,
            assistant_role=t.assistant_role,
            with_condition=cfg.train.mode.uses_condition,
            inference_condition=cfg.inference_condition,
        )

    def prefix(self, role: str, condition: str) -> str:
        name = self.user_role if role == "user" else self.assistant_role
        return self.role_prefix.format(condition=condition if self.with_condition else "", role=name).strip()

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def chat_template(self) -> str:
        """The Jinja chat template saved with the tokenizer: renders exactly what `tokenize_conversation` trains on.

        It takes `condition` as a variable (default: the inference condition)."""
        marker = "\x00"

        def jinja_prefix(role: str) -> str:
            return "{{ condition }}".join(_jinja_literal(part) for part in self.prefix(role, marker).split(marker))

        eot = _jinja_literal(self.end_of_turn)
        return (
            "{%- if condition is not defined %}{%- set condition = "
            + json.dumps(self.inference_condition)
            + " %}{%- endif %}"
            "{%- if bos_token %}{{ bos_token }}{%- endif %}"
            "{%- for message in messages %}"
            "{%- if message['role'] == 'system' %}"
            "{%- if not loop.first %}{{ raise_exception('a system message is allowed only as the first message') }}"
            "{%- endif %}"
            "{{ message['content'] }}" + eot + "{%- elif message['role'] == 'user' %}"
            + jinja_prefix("user")
            + " {{ message['content'] }}"
            + eot
            + "{%- elif message['role'] == 'assistant' %}"
            + jinja_prefix("assistant")
            + " {{ message['content'] }}"
            + eot
            + "{%- else %}{{ raise_exception('unknown role ' + message['role'] + ': expected system/user/assistant') }}"
            "{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}" + jinja_prefix("assistant") + "{%- endif %}"
        )


def _jinja_literal(text: str) -> str:
    """Text that Jinja prints verbatim (role prefixes are config, so they may contain braces)."""
    if "{" not in text and "}" not in text and "%" not in text and "#" not in text:
        return text
    return "{{ " + json.dumps(text) + " }}"


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    weights: list[float]  # weights[t]: loss weight of token t as a target (shifted by the packer)
    condition: str
    truncated: bool = False


# A piece of text between special tokens, with the character span and weight of its supervised content (if any).
@dataclass(frozen=True)
class _Piece:
    text: str
    content_start: int = 0
    content_weight: float = 0.0


class TemplateTokenizer:
    """Applies a Template with one tokenizer. Checks once that the tokenizer has what the template needs."""

    def __init__(self, template: Template, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise CrlftError("the tokenizer must be a fast (Rust) tokenizer: character offsets place the weights")
        eot_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
        if eot_id is None or eot_id == tokenizer.unk_token_id or template.end_of_turn not in tokenizer.get_vocab():
            raise CrlftError(
                f"the tokenizer has no {template.end_of_turn!r} token: load it with crlft.model.load_tokenizer "
                "(which adds it) or build the default with `crlft init-model`"
            )
        self.template = template
        self.tokenizer = tokenizer
        self.eot_id: int = eot_id
        self.bos_ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._special_ids = {token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        # Longest first, so that a literal containing another is matched whole.
        literals = sorted(self._special_ids, key=len, reverse=True)
        self._special_literal = re.compile("(" + "|".join(map(re.escape, literals)) + ")") if literals else None

    def fingerprint(self) -> str:
        vocab = sorted(self.tokenizer.get_vocab().items())
        # How text becomes tokens, besides the vocabulary: the same vocabulary with another prefix rule gives other ids.
        pipeline = json.loads(self.tokenizer.backend_tokenizer.to_str())
        rules = [pipeline.get(key) for key in ("normalizer", "pre_tokenizer", "added_tokens")]
        digest = hashlib.sha256(json.dumps([self.template.fingerprint(), vocab, self.bos_ids, rules]).encode())
        return digest.hexdigest()[:16]

    def _encode_pieces(self, pieces: Sequence[_Piece]) -> list[tuple[list[int], list[float]]]:
        """Ids and weights of each piece of a conversation, tokenized as it stands in the rendered template text:
        after BOS or an end-of-turn (the first piece at the very start when the tokenizer has no BOS), before an
        end-of-turn. Tokenizers are context-sensitive there (SentencePiece's `prepend_scheme=first` adds `▁` only at
        the start of the text), so each piece is wrapped in the special tokens that surround it in the chat
        template's text and those are dropped again: the ids are the chat template's ids by construction."""
        first = self.tokenizer.bos_token if self.bos_ids else ""
        openings = [self.template.end_of_turn if i else first for i in range(len(pieces))]
        encoded = self._encode_in_context([p.text for p in pieces], openings, self.template.end_of_turn)
        out = []
        for piece, (ids, ends) in zip(pieces, encoded, strict=True):
            # A token is supervised when it ends inside the content (a token straddling prefix and content counts).
            weights = [piece.content_weight if piece.content_weight and end > piece.content_start else 0.0
                       for end in ends]
            out.append((ids, weights))
        return out

    def _encode_in_context(self, texts: Sequence[str], openings: Sequence[str],
                           closing: str) -> list[tuple[list[int], list[int]]]:
        """Ids of each text as it stands between the special tokens opening and `closing` ("" for none), with each
        token's end offset in the text; one batched tokenizer call. Special-token literals typed inside a text stay
        plain text: they are tokenized alone with `split_special_tokens`, and the text after one is tokenized as if
        it followed an end-of-turn."""
        parts: list[tuple[int, int, str, str | None]] = []  # (text index, start in the text, part, opening or None)
        for index, (text, opening) in enumerate(zip(texts, openings, strict=True)):
            start = 0
            for k, part in enumerate(self._special_literal.split(text) if self._special_literal else [text]):
                parts.append((index, start, part, None if k % 2 else opening if k == 0 else self.template.end_of_turn))
                start += len(part)
        wrapped = iter(self._encode([o + p + closing for _, _, p, o in parts if o is not None], False))
        literal = iter(self._encode([p for _, _, p, o in parts if o is None], True))
        out: list[tuple[list[int], list[int]]] = [([], []) for _ in texts]
        for index, start, _, opening in parts:
            ids, ends = next(literal) if opening is None else self._unwrap(*next(wrapped), opening, closing)
            out[index][0].extend(ids)
            out[index][1].extend(start + end for end in ends)
        return out

    def _encode(self, texts: list[str], split_special_tokens: bool) -> Iterator[tuple[list[int], list[int]]]:
        if not texts:
            return iter(())
        enc = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens,
                             return_offsets_mapping=True, return_attention_mask=False)
        return ((ids, [end for _, end in offsets]) for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"],
                                                                          strict=True))

    def _unwrap(self, ids: list[int], ends: list[int], opening: str, closing: str) -> tuple[list[int], list[int]]:
        """Drop the wrapping special tokens again (checking they stayed whole) and shift offsets past `opening`."""
        head, tail = int(bool(opening)), int(bool(closing))
        wrapper = [self._special_ids.get(opening)] * head, [self._special_ids.get(closing)] * tail
        if (ids[:head], ids[len(ids) - tail:]) != wrapper:
            raise CrlftError(f"the tokenizer does not keep {opening!r} and {closing!r} as single special tokens")
        return ids[head:len(ids) - tail], [end - len(opening) for end in ends[head:len(ends) - tail]]

    def _pieces(self, system: str, messages: Sequence[Message], condition: str,
                rewards: Mapping[str, float]) -> list[_Piece]:
        pieces = [_Piece(system)] if system else []
        reward = rewards.get(condition, 1.0)
        for m in messages:
            head = self.template.prefix(m.role, condition) + " "
            weight = reward * m.weight if m.role == "assistant" else 0.0
            pieces.append(_Piece(head + m.content, len(head), weight))
        return pieces

    def tokenize_conversation(self, conv: Conversation, rewards: Mapping[str, float], max_len: int | None = None,
                              overflow: str = "truncate", per_sequence: bool = False) -> TokenizedConversation:
        """Token ids and per-token weights for training; over-long conversations are cut at a turn boundary
        (keeping whole user/assistant exchanges) or refused, never cut mid-turn. Raises ValueError when refused."""
        pieces = self._pieces(conv.system, conv.messages, conv.condition, rewards)
        ids, weights = list(self.bos_ids), [0.0] * len(self.bos_ids)
        turn_ends: list[tuple[int, str]] = []  # (length after the turn, its role)
        for i, (piece_ids, piece_weights) in enumerate(self._encode_pieces(pieces)):
            supervised = pieces[i].content_weight > 0
            closing = pieces[i].content_weight if supervised else 0.0
            if per_sequence and supervised:
                n = sum(1 for w in piece_weights if w) + 1  # + its end-of-turn
                piece_weights = [w / n for w in piece_weights]
                closing /= n
            ids += piece_ids + [self.eot_id]
            weights += piece_weights + [closing]
            is_system = bool(conv.system) and i == 0
            if not is_system:
                turn_ends.append((len(ids), conv.messages[i - bool(conv.system)].role))
        truncated = False
        if max_len is not None and len(ids) > max_len:
            fits = [end for end, role in turn_ends if role == "assistant" and end <= max_len]
            if overflow == "reject" or not fits:
                raise ValueError(
                    f"too long: {len(ids)} tokens > max_len {max_len}"
                    + ("" if overflow == "reject" else " even after dropping every turn but the first exchange")
                )
            ids, weights, truncated = ids[: fits[-1]], weights[: fits[-1]], True
        return TokenizedConversation(ids, weights, conv.condition, truncated)

    def tokenize_prompt(self, messages: Sequence[Message], condition: str | None = None, system: str = "") -> list[int]:
        """Ids of a conversation so far plus the assistant prefix: what the server feeds the model."""
        condition = condition or self.template.inference_condition
        ids = list(self.bos_ids)
        for piece_ids, _ in self._encode_pieces(self._pieces(system, messages, condition, {})):
            ids += piece_ids + [self.eot_id]
        [(head, _)] = self._encode_in_context([self.template.prefix("assistant", condition)],
                                              [self.template.end_of_turn], "")
        return ids + head

    def render(self, conv: Conversation) -> str:
        """The conversation as text, exactly as the model sees it (for `crlft data show` and debugging)."""
        eot = self.template.end_of_turn
        bos = self.tokenizer.bos_token or ""
        body = "".join(p.text + eot for p in self._pieces(conv.system, conv.messages, conv.condition, {}))
        return bos + body
