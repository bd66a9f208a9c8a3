"""refformer.runtime"""
