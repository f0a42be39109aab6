from serving.engine.protocol import ChoiceDelta, EngineClient, GenerationUpdate, SamplingOptions, TokenLogprob

__all__ = ["ChoiceDelta", "EngineClient", "GenerationUpdate", "SamplingOptions", "TokenLogprob"]
