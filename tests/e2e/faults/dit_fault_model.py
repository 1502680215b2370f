"""Test double for the `dit` Triton model: the real ONNX Runtime model plus a fault plan, for the fault suite.

`tests/e2e/test_faults_triton.py` copies the built repository, renames the real `dit/1/model.py` to
`real_model.py` and puts this file in its place. Nothing changes until the test writes
`dit/1/fault_plan.json`, e.g. `{"fail_at_call": 3, "mode": "raise"}`: counting from the moment that file
(re)appears, the Nth `execute` call fails once - `raise` raises out of `execute` (as an engine error does;
Triton answers the BLS call with an error) and `exit` kills this model's stub process (an engine crash).
Every later call runs normally. No product code knows about this file.
"""

import importlib.util
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("dit_real_model", os.path.join(_HERE, "real_model.py"))
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)


class TritonPythonModel(_real.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        self._plan_path = os.path.join(_HERE, "fault_plan.json")
        self._plan_stamp = None
        self._plan = None
        self._calls = 0

    def execute(self, requests):
        plan = self._current_plan()
        if plan is not None:
            self._calls += 1
            if self._calls == int(plan["fail_at_call"]):
                if plan.get("mode") == "exit":
                    os._exit(1)
                # an engine error names its engine file: the front end must not pass the path on
                raise RuntimeError(f"injected engine failure at call {self._calls} "
                                   f"(engine {os.path.join(_HERE, 'model.onnx')})")
        return super().execute(requests)

    def _current_plan(self):
        try:
            stamp = os.stat(self._plan_path).st_mtime_ns
        except FileNotFoundError:
            self._plan_stamp = self._plan = None
            return None
        if stamp != self._plan_stamp:
            with open(self._plan_path, encoding="utf-8") as handle:
                self._plan = json.load(handle)
            self._plan_stamp = stamp
            self._calls = 0
        return self._plan
