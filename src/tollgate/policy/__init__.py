"""Request policy: attribution headers, end-user identity, enforcement."""
