"""kvmanager's vLLM integration: ``kvmanager.vllm.connector.KvmanagerConnector``."""
