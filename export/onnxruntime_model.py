"""Triton Python-backend model that serves one ONNX graph with ONNX Runtime.

export/build_engines.py copies this file as `<model>/1/model.py` for every component model on the
`onnxruntime` backend, next to `<model>/1/model.onnx`. Triton input tensors are matched to the graph's
inputs by name; the outputs declared in config.pbtxt are returned. ONNX Runtime's CUDA provider is used
when it is installed (onnxruntime-gpu), the CPU provider otherwise. A failing request gets a TritonError
response; the model keeps serving.

config.pbtxt parameters (all optional): `onnx_file` (default "model.onnx"), `intra_op_num_threads`
(0 = ONNX Runtime's default, one per core).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], parameters.get("onnx_file") or "model.onnx")

        options = ort.SessionOptions()
        threads = int(parameters.get("intra_op_num_threads") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        # Each component is its own process and the pipeline calls them one after another: idle threads that
        # spin-wait for work would steal the cores the next component needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id") or 0) if args.get("model_instance_kind") == "GPU" else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
        self.session = ort.InferenceSession(path, options, providers=providers)

        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [output["name"] for output in config.get("output", [])]
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [name for name in self.output_names if name not in graph_outputs]
        if missing:  # a repository/graph mismatch: refuse to load rather than fail every request
            raise ValueError(f"{self.name}: config.pbtxt declares outputs {missing} that {path} does not have")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self.session.run(self.output_names, self._feeds(request))
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value))
                           for name, value in zip(self.output_names, outputs)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # noqa: BLE001 - every failure becomes this request's error response
                message = f"{self.name}: {type(error).__name__}: {error}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def _feeds(self, request) -> dict:
        feeds = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input tensor {name!r}")
            feeds[name] = tensor.as_numpy()
        return feeds

    def finalize(self):
        self.session = None
