"""The report's notes: one line per kind of remark, however many runs it concerns (a count and
at most :data:`EXAMPLES` examples, never a list of every run)."""

from __future__ import annotations

EXAMPLES = 2


class Notes:
    def __init__(self) -> None:
        self._items: dict[str, list[str]] = {}

    def add(self, text: str, item: str | None = None) -> None:
        """A remark; remarks with the same ``text`` are one line, counting their ``item``s."""
        items = self._items.setdefault(text, [])
        if item is not None and item not in items:
            items.append(item)

    def extend(self, lines) -> None:
        for line in lines:
            self.add(line)

    def __contains__(self, text: str) -> bool:
        return text in self._items

    def __len__(self) -> int:
        return len(self._items)

    def lines(self) -> list[str]:
        out = []
        for text, items in self._items.items():
            if not items:
                out.append(text)
                continue
            n = len(items)
            shown = ", ".join(f"`{i}`" for i in items[:EXAMPLES])
            what = f"{n} run{'s' if n != 1 else ''}"
            out.append(f"{text} ({what}: {shown})" if n <= EXAMPLES
                       else f"{text} ({what}, e.g. {shown})")
        return out
