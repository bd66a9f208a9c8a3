"""refformer.export"""
