from .conversation import Conversation, MessageView
from .prompt import PromptInput
from .stats_panel import StatsPanel

__all__ = ["Conversation", "MessageView", "PromptInput", "StatsPanel"]
