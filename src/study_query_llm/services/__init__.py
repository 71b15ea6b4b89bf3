"""Services: preprocessing, inference, conversations, embeddings, studies, batch jobs."""
