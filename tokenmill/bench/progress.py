"""The benchmark's progress bar: it moves with generated tokens (the work done), so a run of a few long
requests shows progress long before the first one finishes; the finished requests are counted beside it."""

from __future__ import annotations

from tqdm import tqdm

from tokenmill.bench.dataset import BenchPrompt


class TokenProgress:
    """tqdm over the run's expected output tokens, with "k/n requests" as its postfix."""

    def __init__(self, prompts: list[BenchPrompt], desc: str, enabled: bool = True) -> None:
        self.bar = tqdm(total=sum(p.output_len for p in prompts), desc=desc, unit="tok", disable=not enabled,
                        leave=False)
        self.num_requests = len(prompts)
        self.num_done = 0

    def add_tokens(self, count: int) -> None:
        if count > 0:
            self.bar.update(count)

    def request_done(self) -> None:
        self.num_done += 1
        self.bar.set_postfix_str(f"{self.num_done}/{self.num_requests} requests")

    def close(self) -> None:
        self.bar.close()
