"""Model definitions the project needs that torchvision does not ship."""
