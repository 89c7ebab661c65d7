"""robots.txt rules for the crawler, parsed by Protego (RFC 9309: the group for our product
token, longest match, ``*`` and ``$`` patterns, fractional ``Crawl-delay``)."""
from __future__ import annotations

from dataclasses import dataclass

from lmfoundry.tasks.acquire.urls import request_target
from protego import Protego


@dataclass
class RobotsRules:
    parsed: Protego | None = None  # None: no robots.txt, no restrictions (RFC 9309)
    product: str = "*"  # our product token, e.g. "lmfoundry-crawler"
    disallow_all: bool = False  # robots.txt unreachable (5xx): the host is closed

    @property
    def crawl_delay(self) -> float | None:
        delay = self.parsed.crawl_delay(self.product) if self.parsed else None
        return None if delay is None else max(0.0, float(delay))

    def allows(self, url: str) -> bool:
        if self.disallow_all:
            return False
        if self.parsed is None or request_target(url) == "/robots.txt":
            return True
        return self.parsed.can_fetch(url, self.product)


def parse_robots(text: str, user_agent: str) -> RobotsRules:
    """The rules of the group for our product token (``user_agent`` up to its '/'), else of '*'."""
    return RobotsRules(Protego.parse(text), product=user_agent.split("/")[0].strip())
