from tests.harness import OpCase

CASES: list[OpCase] = []
