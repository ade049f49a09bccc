"""The conditioned conversation template, defined once (CRLFT.md, "Class-conditioned policy").

    <s>[system<|end_of_turn|>]GPT4 User: {user}<|end_of_turn|>GPT4 Assistant: {assistant}<|end_of_turn|>...

Training (`tokenize_conversation`), serving (`tokenize_prompt`) and the tokenizer's Jinja `chat_template`
(`chat_template`) all come from `Template`, so they cannot disagree. Text is tokenized in the pieces between the
template's own special tokens, with `split_special_tokens=True`, so that a user typing `<|end_of_turn|>` gets plain
text; the Jinja template renders the same pieces, and Hugging Face splits a rendered string at special tokens before
tokenizing, so both give the same ids for any text that contains no special-token literal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

from crlft.config import Config
from crlft.conversation import Conversation, Message
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

    def fingerprint(self) -> str:
        vocab = sorted(self.tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps([self.template.fingerprint(), vocab, self.bos_ids]).encode())
        return digest.hexdigest()[:16]

    def _encode_pieces(self, pieces: Sequence[_Piece]) -> list[tuple[list[int], list[float]]]:
        enc = self.tokenizer(
            [p.text for p in pieces],
            add_special_tokens=False,
            split_special_tokens=True,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        out = []
        for piece, ids, offsets in zip(pieces, enc["input_ids"], enc["offset_mapping"], strict=True):
            # A token is supervised when it ends inside the content (a token straddling prefix and content counts).
            weights = [piece.content_weight if piece.content_weight and end > piece.content_start else 0.0
                       for _, end in offsets]
            out.append((list(ids), weights))
        return out

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
        head = self.tokenizer(
            self.template.prefix("assistant", condition), add_special_tokens=False, split_special_tokens=True
        )["input_ids"]
        return ids + list(head)

    def render(self, conv: Conversation) -> str:
        """The conversation as text, exactly as the model sees it (for `crlft data show` and debugging)."""
        eot = self.template.end_of_turn
        bos = self.tokenizer.bos_token or ""
        body = "".join(p.text + eot for p in self._pieces(conv.system, conv.messages, conv.condition, {}))
        return bos + body
